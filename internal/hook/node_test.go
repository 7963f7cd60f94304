package hook

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/deliver"
	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// tempNode skips without root, and returns a temp directory short enough
// for unix sockets and a tmpfs state directory of sizeMiB in it, both
// removed when t ends.
func tempNode(t *testing.T, sizeMiB int) (dir, state string) {
	t.Helper()
	return testhelp.TempNode(t, "needs root: tmpfs state directory and a mount namespace", "hook-", fmt.Sprintf("size=%dm", sizeMiB))
}

// agentNode is tempNode with a fake agent serving on the node's admin
// socket, and the hook's configuration for the two.
func agentNode(t *testing.T, sizeMiB int) (dir, state string, fake *fakeagent.Agent, cfg config.Config) {
	t.Helper()
	dir, state = tempNode(t, sizeMiB)
	socket := filepath.Join(dir, "a.sock")
	fake = fakeagent.Start(t, "example.org", socket)
	cfg = config.Default()
	cfg.AgentAdminSocket = socket
	cfg.StateDir = state
	return dir, state, fake, cfg
}

// writeBundle writes an OCI bundle under dir, its config.json spec and
// its root "rootfs", and returns its path.
func writeBundle(dir string, spec specs.Spec) string {
	bundle := filepath.Join(dir, "bundle")
	os.MkdirAll(filepath.Join(bundle, "rootfs"), 0o755)
	data, _ := json.Marshal(spec)
	os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o644)
	return bundle
}

// initStandIn starts a process in a mount namespace of its own, standing
// in for "runc init", and returns its pid once it is in that namespace;
// it is killed when t ends.
func initStandIn(t *testing.T) int {
	t.Helper()
	proc := exec.Command("unshare", "--mount", "--propagation", "private", "sleep", "300")
	if err := proc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.Process.Kill(); proc.Wait() })
	own, _ := os.Readlink("/proc/self/ns/mnt")
	dir := filepath.Join("/proc", strconv.Itoa(proc.Process.Pid))
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		// In a namespace of its own, and already sleep: unshare makes the
		// namespace's mounts private only after entering it, and a mount
		// made before that would propagate to this test's namespace.
		ns, _ := os.Readlink(filepath.Join(dir, "ns/mnt"))
		comm, _ := os.ReadFile(filepath.Join(dir, "comm"))
		if ns != "" && ns != own && string(comm) == "sleep\n" {
			return proc.Process.Pid
		}
		if time.Now().After(deadline) {
			t.Fatal("unshare did not enter a new mount namespace")
		}
	}
}

// directHook is the hook that asks the agent itself (spiffe-oci-hook-direct),
// with each of set applied to its deliverer.
func directHook(cfg config.Config, set ...func(*deliver.Deliverer)) *Hook {
	d := &deliver.Deliverer{Config: cfg}
	for _, f := range set {
		f(d)
	}
	return &Hook{Config: cfg, Deliver: d.Direct}
}
