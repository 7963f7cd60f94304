package process

import (
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func startProc(t *testing.T, attr *syscall.SysProcAttr, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.SysProcAttr = attr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func exited(cmd *exec.Cmd, within time.Duration) bool {
	done := make(chan struct{})
	go func() { cmd.Process.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(within):
		return false
	}
}

// TestSignalRisk: what a renew_signal does to the process it reaches,
// checked by sending it. A PID namespace's init without a handler is
// spared by the kernel; a process that is not its namespace's init dies;
// so does the child of an init wrapper that forwards signals (catatonit,
// as podman run --init uses it).
func TestSignalRisk(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: a new PID namespace")
	}
	t.Run("namespace init without a handler", func(t *testing.T) {
		cmd := startProc(t, &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWPID}, "sleep", "300")
		time.Sleep(100 * time.Millisecond)
		if risk, err := SignalRisk(cmd.Process.Pid, unix.SIGHUP); err != nil || risk != "" {
			t.Fatalf("SignalRisk = %q, %v; want none", risk, err)
		}
		cmd.Process.Signal(unix.SIGHUP)
		if exited(cmd, 300*time.Millisecond) {
			t.Error("the namespace's init died of SIGHUP: the kernel did not drop it")
		}
	})
	t.Run("not the namespace's init", func(t *testing.T) {
		cmd := startProc(t, nil, "sleep", "300")
		time.Sleep(100 * time.Millisecond)
		risk, err := SignalRisk(cmd.Process.Pid, unix.SIGHUP)
		if err != nil || !strings.Contains(risk, "not its PID namespace's init") {
			t.Fatalf("SignalRisk = %q, %v", risk, err)
		}
		if r, _ := SignalRisk(cmd.Process.Pid, unix.SIGWINCH); r != "" {
			t.Errorf("SIGWINCH, ignored by default, was called a risk: %s", r)
		}
		cmd.Process.Signal(unix.SIGHUP)
		if !exited(cmd, 2*time.Second) {
			t.Error("SIGHUP did not kill a process without a handler: the risk is not real")
		}
	})
	t.Run("forwarding init wrapper", func(t *testing.T) {
		catatonit, err := exec.LookPath("catatonit")
		if err != nil {
			t.Skip("catatonit is not installed (test/deps.sh installs podman, which brings it)")
		}
		cmd := startProc(t, &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWPID}, catatonit, "--", "sleep", "300")
		var risk string
		deadline := time.Now().Add(5 * time.Second)
		for risk == "" && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
			risk, err = SignalRisk(cmd.Process.Pid, unix.SIGHUP)
		}
		if err != nil || !strings.Contains(risk, "forwards SIGHUP") {
			t.Fatalf("SignalRisk = %q, %v", risk, err)
		}
		// What it would do: catatonit passes SIGHUP to sleep, which dies,
		// and catatonit exits with it.
		cmd.Process.Signal(unix.SIGHUP)
		if !exited(cmd, 2*time.Second) {
			t.Error("catatonit survived a forwarded SIGHUP: the risk is not real")
		}
	})
	t.Run("handler", func(t *testing.T) {
		cmd := startProc(t, nil, "sh", "-c", "trap 'echo' HUP; while :; do sleep 0.05; done")
		time.Sleep(200 * time.Millisecond)
		if risk, err := SignalRisk(cmd.Process.Pid, unix.SIGHUP); err != nil || risk != "" {
			t.Fatalf("SignalRisk = %q, %v; want none", risk, err)
		}
	})
}
