package process

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

func TestOpenSelf(t *testing.T) {
	p, err := Open(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.PID != os.Getpid() {
		t.Fatalf("PID = %d", p.PID)
	}
	if p.StartTime == 0 {
		t.Fatal("StartTime = 0")
	}
	if p.FD() < 0 {
		t.Fatalf("FD() = %d", p.FD())
	}
	if err := p.Alive(); err != nil {
		t.Fatalf("Alive() = %v", err)
	}
	st, err := StartTime(os.Getpid())
	if err != nil || st != p.StartTime {
		t.Fatalf("StartTime() = %d, %v; want %d", st, err, p.StartTime)
	}
	// The recorded start time opens the same process again.
	q, err := OpenRecorded(os.Getpid(), p.StartTime)
	if err != nil {
		t.Fatalf("OpenRecorded with the right start time: %v", err)
	}
	q.Close()
	if err := p.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close() = %v", err)
	}
	if p.FD() != -1 {
		t.Fatalf("FD() after Close = %d", p.FD())
	}
}

func TestOpenInvalid(t *testing.T) {
	for _, pid := range []int{0, -1} {
		if _, err := Open(pid); err == nil || errors.Is(err, ErrGone) {
			t.Fatalf("Open(%d) error = %v, want a not-a-process error", pid, err)
		}
	}
}

func TestOpenExited(t *testing.T) {
	cmd := exec.Command("sleep", "0")
	if err := cmd.Start(); err != nil {
		t.Fatalf("cannot start sleep: %v", err)
	}
	pid := cmd.Process.Pid
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	p, err := Open(pid)
	if err == nil {
		p.Close()
		t.Fatalf("Open of reaped pid %d succeeded", pid)
	}
	if !errors.Is(err, ErrGone) {
		t.Fatalf("Open of reaped pid: error = %v, want ErrGone", err)
	}
	if _, err := StartTime(pid); !errors.Is(err, ErrGone) {
		t.Fatalf("StartTime of reaped pid: error = %v, want ErrGone", err)
	}
}

func TestOpenRecordedWrongStartTime(t *testing.T) {
	p, err := Open(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for _, st := range []uint64{p.StartTime + 1, p.StartTime - 1, 0} {
		q, err := OpenRecorded(os.Getpid(), st)
		if err == nil {
			q.Close()
			t.Fatalf("OpenRecorded with start time %d (real %d) succeeded", st, p.StartTime)
		}
		if !errors.Is(err, ErrGone) {
			t.Fatalf("OpenRecorded with wrong start time: error = %v, want ErrGone", err)
		}
	}
}

func TestAliveAfterExit(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatalf("cannot start sleep: %v", err)
	}
	p, err := Open(cmd.Process.Pid)
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Alive(); err != nil {
		t.Fatalf("Alive() of a running child = %v", err)
	}
	st, err := StartTime(cmd.Process.Pid)
	if err != nil || st != p.StartTime || st == 0 {
		t.Fatalf("StartTime() = %d, %v; want %d", st, err, p.StartTime)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if err := p.Alive(); !errors.Is(err, ErrGone) {
		t.Fatalf("Alive() after exit and reap = %v, want ErrGone", err)
	}
	if _, err := OpenRecorded(cmd.Process.Pid, p.StartTime); !errors.Is(err, ErrGone) {
		t.Fatalf("OpenRecorded after exit = %v, want ErrGone", err)
	}
}

// TestAliveWithoutPermission: a caller that may not signal the process (no
// CAP_KILL, another uid: a refresher whose unit lost CAP_KILL and a
// container running as uid 1000) still sees it alive, and pins it.
func TestAliveWithoutPermission(t *testing.T) {
	if pid := os.Getenv("PROCESS_TEST_PID"); pid != "" {
		n, _ := strconv.Atoi(pid)
		p, err := Open(n)
		if err != nil {
			fmt.Fprintln(os.Stderr, "Open:", err)
			os.Exit(1)
		}
		if err := p.Alive(); err != nil {
			fmt.Fprintln(os.Stderr, "Alive:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if os.Getuid() != 0 {
		t.Skip("needs root to run processes as other uids")
	}
	sleep := exec.Command("sleep", "60")
	sleep.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65533, Gid: 65533}}
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleep.Process.Kill(); sleep.Wait() }()

	// This test binary again, as another unprivileged uid; it must be
	// readable there.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "process-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "process.test")
	if err := os.WriteFile(exe, data, 0o755); err != nil {
		t.Fatal(err)
	}
	helper := exec.Command(exe, "-test.run=^TestAliveWithoutPermission$")
	helper.Env = append(os.Environ(), "PROCESS_TEST_PID="+strconv.Itoa(sleep.Process.Pid))
	helper.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if out, err := helper.CombinedOutput(); err != nil {
		t.Fatalf("uid 65534 pinning uid 65533's process: %v\n%s", err, out)
	}
}

func TestFromPidfd(t *testing.T) {
	self, err := Open(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	fd, err := dupPidfd(self)
	if err != nil {
		t.Fatal(err)
	}
	p, err := FromPidfd(fd)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.PID != self.PID || p.StartTime != self.StartTime {
		t.Fatalf("FromPidfd = pid %d start %d; want %d, %d", p.PID, p.StartTime, self.PID, self.StartTime)
	}

	// A file that is not a pidfd is refused, and closed.
	f, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	nfd, err := syscall.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := FromPidfd(nfd); err == nil || !strings.Contains(err.Error(), "not a pidfd") {
		t.Fatalf("FromPidfd(/dev/null) = %v; want not a pidfd", err)
	}

	// A pidfd whose process exited is refused as gone.
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	child, err := Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	cfd, err := dupPidfd(child)
	child.Close()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := FromPidfd(cfd); !errors.Is(err, ErrGone) {
		t.Fatalf("FromPidfd(exited) = %v; want ErrGone", err)
	}
}

// dupPidfd returns a new descriptor for p's pidfd, as another process
// would receive it, for FromPidfd to take over.
func dupPidfd(p *Process) (int, error) {
	return syscall.Dup(p.FD())
}
