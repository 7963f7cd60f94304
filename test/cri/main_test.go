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
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/spiretest"
)

func TestMain(m *testing.M) {
	// conmon and containerd-shim-runc-v2 daemonize; without a subreaper
	// they (and the containers under them) would be reparented to PID 1,
	// which on this kind of machine does not reap.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "cri: PR_SET_CHILD_SUBREAPER: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	if left := killOrphans(); len(left) > 0 && code == 0 {
		// Every test stops what it started; an orphan here is a leak.
		fmt.Fprintf(os.Stderr, "cri: processes outlived the tests (killed): %q\n", left)
		code = 1
	}
	os.Exit(code)
}

// killOrphans kills and reaps every child process of the test binary that
// is still there (daemonized shims and conmons, and their containers,
// reparented to it) and returns their command lines.
func killOrphans() []string {
	var killed []string
	for range 50 {
		pids := children()
		reap(0)
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			if _, state := ppid(pid); state == 'Z' || state == 0 {
				// Exited (a daemon's intermediate process, reparented
				// here) and reaped: not a leak.
				continue
			}
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			unix.Kill(pid, unix.SIGKILL)
			killed = append(killed, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(strings.TrimRight(string(cmdline), "\x00"), "\x00", " ")))
		}
		reap(2 * time.Second)
	}
	reap(0)
	return killed
}

// children lists the pids whose parent is this process.
func children() []int {
	self := os.Getpid()
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		if pp, _ := ppid(pid); pp == self {
			pids = append(pids, pid)
		}
	}
	return pids
}

// ppid reads the state and the parent pid from /proc/pid/stat (the
// fields after the parenthesized command name, which may hold spaces).
func ppid(pid int) (int, byte) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	i := len(data) - 1
	for i > 0 && data[i] != ')' {
		i--
	}
	var state byte
	var pp int
	fmt.Sscanf(string(data[i+1:]), " %c %d", &state, &pp)
	return pp, state
}

// reap collects exited children that no exec.Cmd waits for, for up to d.
func reap(d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.ECHILD || (pid <= 0 && time.Now().After(deadline)) {
			return
		}
		if pid <= 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
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
	if testing.Short() {
		t.Skip("cri: skipped in -short mode")
	}
	spiretest.RequireRoot(t)
	for _, tool := range []string{"runc", "conmon", "podman", "make"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("cri: %s is missing: run test/deps.sh", tool)
		}
	}
	toolOnce.Do(func() {
		repoRoot = spiretest.RepoRoot(t)
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
	dir, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, m := range mountsUnder(dir) {
			unix.Unmount(m, unix.MNT_DETACH)
		}
		os.RemoveAll(dir)
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
