package hook

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// tempNode skips without root, and returns a temp directory short enough
// for unix sockets and a tmpfs state directory of sizeMiB in it, both
// removed when t ends.
func tempNode(t *testing.T, sizeMiB int) (dir, state string) {
	t.Helper()
	return testhelp.TempNode(t, "needs root: tmpfs state directory and a mount namespace", "hook-", fmt.Sprintf("size=%dm", sizeMiB))
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
