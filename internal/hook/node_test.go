package hook

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/deliver"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// tempNode skips without root, and returns a temp directory short enough
// for unix sockets and a tmpfs state directory of sizeMiB in it, both
// removed when t ends.
func tempNode(t *testing.T, sizeMiB int) (dir, state string) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root: tmpfs state directory and a mount namespace")
	}
	dir, err := os.MkdirTemp("/tmp", "hook-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	state = filepath.Join(dir, "state")
	testhelp.MountTmpfs(t, state, fmt.Sprintf("size=%dm", sizeMiB))
	return dir, state
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
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if ns, _ := os.Readlink(filepath.Join("/proc", strconv.Itoa(proc.Process.Pid), "ns/mnt")); ns != "" && ns != own {
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
