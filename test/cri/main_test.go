// Package cri runs spiffe-oci-hook under CRI-O and containerd, driven
// through the CRI by crictl the way the kubelet drives them, against a real
// SPIRE server and agent whose k8s workload attestor asks a stand-in
// kubelet. It needs root, runc, conmon, podman, gcc and libseccomp-dev
// (test/deps.sh installs them); the runtimes and crictl are built from the
// pinned tools modules test/crio, test/containerd and test/crictl, SPIRE
// from test/spire.
//
// Each runtime runs once per test binary (TestCRIO, TestContainerd), on
// sockets and directories under its own temp dir: nothing goes to /etc,
// /run/containerd or the host's containers-storage. The test binary is a
// child subreaper, so every conmon, shim and container process the
// runtimes leave behind is its child, killed and reaped before it exits.
package cri

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
	"github.com/noderesource/spiffe-oci-hook/test/subreaper"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

func TestMain(m *testing.M) {
	// conmon and containerd-shim-runc-v2 daemonize; without a subreaper
	// they (and the containers under them) would be reparented to PID 1,
	// which on this kind of machine does not reap.
	subreaper.Main(m, "cri")
}

// Paths of the binaries under test and the tools, set by requireTools.
var (
	repoRoot string
	toolDir  string // crio, pinns, containerd, shim, ctr, crictl
	nriBin   string
	toolsErr error
	toolOnce sync.Once
)

// requireTools skips without root, and builds (once per test binary) the
// pinned runtimes and crictl, one at a time, and the NRI plugin.
func requireTools(t *testing.T) {
	t.Helper()
	testhelp.SkipShort(t, "cri")
	spiretest.RequireRoot(t)
	testhelp.Installed(t, "cri", "runc", "conmon", "podman", "make")
	toolOnce.Do(func() {
		repoRoot = testhelp.RepoRoot(t)
		toolDir = filepath.Join(repoRoot, "bin", "test")
		for _, mod := range []string{"crictl", "crio", "containerd"} {
			cmd := exec.Command(filepath.Join(repoRoot, "test", mod, "build.sh"), toolDir)
			if out, err := cmd.CombinedOutput(); err != nil {
				toolsErr = fmt.Errorf("test/%s/build.sh: %v\n%s", mod, err, out)
				return
			}
		}
		nriBin = filepath.Join(toolDir, "spiffe-oci-nri")
		if out, err := exec.Command("go", "build", "-o", nriBin, filepath.Join(repoRoot, "nri")).CombinedOutput(); err != nil {
			toolsErr = fmt.Errorf("building nri: %v\n%s", err, out)
		}
	})
	if toolsErr != nil {
		t.Fatal(toolsErr)
	}
}

// tempDir is a fresh directory with a short path under /tmp (unix socket
// paths are limited to 108 bytes), unmounting whatever is left mounted
// under it before removing it.
func tempDir(t *testing.T, prefix string) string {
	t.Helper()
	dir := testhelp.ShortTempDir(t, prefix)
	t.Cleanup(func() { // before the removal, which was registered first
		for _, m := range mountsUnder(dir) {
			unix.Unmount(m, unix.MNT_DETACH)
		}
	})
	return dir
}

// stop sends sig to cmd's process and waits up to d for it to exit, then
// kills it. It returns how long the process took.
func stop(cmd *exec.Cmd, done <-chan struct{}, sig syscall.Signal, d time.Duration) (time.Duration, bool) {
	start := time.Now()
	cmd.Process.Signal(sig)
	select {
	case <-done:
		return time.Since(start), true
	case <-time.After(d):
		cmd.Process.Kill()
		<-done
		return time.Since(start), false
	}
}
