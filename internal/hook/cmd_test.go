package hook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// runCommand runs spiffe-oci-hook (Handoff, with fallback recording what
// it was given instead of exec'ing) on n's container, and returns its exit
// code, its stderr and the fallback's arguments and state (nil: not run).
func runCommand(t *testing.T, n *fakeNode) (code int, stderr string, fallbackArgs []string, fallbackState []byte) {
	t.Helper()
	state, err := json.Marshal(n.req.State)
	if err != nil {
		t.Fatal(err)
	}
	cmd := Command{
		Name:    "spiffe-oci-hook",
		Deliver: func(h *Hook) DeliverFunc { return h.Handoff },
		Fallback: func(args []string, state []byte) error {
			fallbackArgs, fallbackState = args, state
			// What spiffe-oci-hook-direct would do.
			h := directHook(n.cfg)
			return h.Create(context.Background(), n.req)
		},
	}
	conf := filepath.Join(t.TempDir(), "config.yaml")
	body := fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\nregistration_wait: %s\n", n.cfg.AgentAdminSocket, n.cfg.StateDir, n.cfg.RegistrationWait)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"--config", conf, "createRuntime"}
	var out bytes.Buffer
	code = cmd.Run(args, bytes.NewReader(state), &out)
	if fallbackArgs != nil && !slices.Equal(fallbackArgs, args) {
		t.Errorf("fallback given %q; want the hook's own arguments %q", fallbackArgs, args)
	}
	if fallbackState != nil && !bytes.Equal(fallbackState, state) {
		t.Errorf("fallback given state %q; want the hook's stdin %q", fallbackState, state)
	}
	return code, out.String(), fallbackArgs, fallbackState
}

// TestCommandHandsOver: with a refresher serving the node, spiffe-oci-hook
// hands the container over and does not fall back.
func TestCommandHandsOver(t *testing.T) {
	n := newFakeNode(t)
	startRefresher(t, n.cfg, nil)
	code, stderr, fellBack, _ := runCommand(t, n)
	if code != 0 || fellBack != nil {
		t.Fatalf("exit %d, fallback %v, stderr %q; want the refresher to serve it", code, fellBack != nil, stderr)
	}
	if _, err := (statedir.Store{Dir: n.cfg.StateDir}).Load("c1"); err != nil {
		t.Fatalf("no record: %v", err)
	}
}

// TestCommandFallsBack: with no refresher listening, spiffe-oci-hook runs
// spiffe-oci-hook-direct with its own arguments and stdin; its notice is
// for syslog, so that stderr keeps the one line a refusal prints.
func TestCommandFallsBack(t *testing.T) {
	n := newFakeNode(t)
	code, stderr, fellBack, _ := runCommand(t, n)
	if code != 0 || fellBack == nil || stderr != "" {
		t.Fatalf("exit %d, fallback %v, stderr %q; want the direct path, silently on stderr", code, fellBack != nil, stderr)
	}
	if _, err := (statedir.Store{Dir: n.cfg.StateDir}).Load("c1"); err != nil {
		t.Fatalf("no record after the fallback: %v", err)
	}
}

// TestRefresherDiesMidRequest: a refresher that took the request, wrote
// part of the files and died before it answered leaves nothing the
// fallback could mistake for a delivery: the hook removes it, and the
// direct path delivers from scratch.
func TestRefresherDiesMidRequest(t *testing.T) {
	n := newFakeNode(t)
	store := statedir.Store{Dir: n.cfg.StateDir}
	if err := store.Init(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", store.HandoffSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	partial := store.DeliveryDir("c1", 0) + "/half-written"
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.ReadAll(c)
		os.MkdirAll(store.DeliveryDir("c1", 0), 0o700)
		os.WriteFile(partial, []byte("half"), 0o600)
		c.Close() // killed: no answer
	}()
	code, stderr, fellBack, _ := runCommand(t, n)
	if code != 0 || fellBack == nil {
		t.Fatalf("exit %d, fallback %v, stderr %q; want the direct path after the refresher died", code, fellBack != nil, stderr)
	}
	if _, err := os.Stat(partial); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the dead refresher's half-written file is still there: %v", err)
	}
	if _, err := store.Load("c1"); err != nil {
		t.Fatalf("no record after the fallback: %v", err)
	}
}

// TestRefresherRefusal: a refresher's refusal (here: no entry for the
// pid) is the container's one failure line, and no fallback runs: the
// agent would say the same to the hook. The refresher waits for the entry
// as long as the hook's configuration says (here not at all), not its own.
func TestRefresherRefusal(t *testing.T) {
	n := newFakeNode(t)
	n.fake.Set(n.req.State.Pid)
	refresherCfg := n.cfg
	refresherCfg.RegistrationWait = time.Minute
	startRefresher(t, refresherCfg, nil)
	n.cfg.RegistrationWait = 0
	code, stderr, fellBack, _ := runCommand(t, n)
	if code != 1 || fellBack != nil || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "container c1: ") || !strings.Contains(stderr, "registration entry") || strings.Contains(stderr, "waited") {
		t.Fatalf("exit %d, fallback %v, stderr %q; want one line naming the container and the missing entry", code, fellBack != nil, stderr)
	}
	n.nothingDelivered(t)
}
