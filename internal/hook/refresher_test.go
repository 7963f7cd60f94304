package hook

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// TestCheckRefresher: with require_refresher, a container is refused when
// no refresher ever served the node or its last heartbeat is older than
// refresher_grace, and accepted within it; without it, nothing is read.
func TestCheckRefresher(t *testing.T) {
	state := t.TempDir()
	store := statedir.Store{Dir: state}
	cfg := config.Default()
	cfg.StateDir = state
	cfg.RefresherGrace = time.Minute
	h := directHook(cfg)
	now := time.Now()

	if err := h.CheckRefresher(now); err != nil {
		t.Errorf("require_refresher off, no heartbeat: %v", err)
	}
	h.Config.RequireRefresher = true
	if err := h.CheckRefresher(now); err == nil || !strings.Contains(err.Error(), "no spiffe-oci-refresher has served this node yet") {
		t.Errorf("no heartbeat: %v", err)
	}
	for _, c := range []struct {
		age  time.Duration
		want string // "" accepted
	}{
		{0, ""},
		{59 * time.Second, ""},
		{61 * time.Second, "ago; refresher_grace 1m0s"},
		{time.Hour, "since " + now.Add(-time.Hour).UTC().Format(time.RFC3339)},
	} {
		if err := store.Heartbeat(now.Add(-c.age)); err != nil {
			t.Fatal(err)
		}
		err := h.CheckRefresher(now)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("heartbeat %s old: refused: %v", c.age, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "docs/install-lifecycle.md")):
			t.Errorf("heartbeat %s old: %v, want an error with %q and what to do", c.age, err, c.want)
		}
	}
	if st, err := os.Stat(store.HeartbeatPath()); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("heartbeat file: %v %v, want mode 0600", st, err)
	}
}

// TestCreateChecksRefresherFirst: Create refuses before asking the agent
// (the node's socket here does not exist) and leaves nothing behind.
func TestCreateChecksRefresherFirst(t *testing.T) {
	state := t.TempDir()
	cfg := config.Default()
	cfg.StateDir = state
	cfg.AgentAdminSocket = filepath.Join(t.TempDir(), "missing.sock")
	cfg.RequireRefresher = true
	h := directHook(cfg)
	req := &Request{
		State:      &specs.State{ID: "c1", Pid: os.Getpid()},
		Spec:       &specs.Spec{Process: &specs.Process{}},
		Key:        "identity.noderesource.dev/container",
		Deliveries: nil,
	}
	err := h.Create(context.Background(), req)
	if err == nil || !strings.Contains(err.Error(), "no spiffe-oci-refresher has served this node yet") {
		t.Fatalf("Create: %v, want the refresher's line", err)
	}
	if ents, _ := os.ReadDir(state); len(ents) != 0 {
		t.Errorf("the state directory holds %d entries after a refusal", len(ents))
	}
}
