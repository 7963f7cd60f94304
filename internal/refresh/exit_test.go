package refresh

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/process"
)

// zombieChild starts a child that exits when its stdin closes and that
// this test reaps only when it says so (cmd.Wait): between the two it is a
// zombie, the state in which kernels before 6.9 wake pidfd pollers for
// the last time.
func zombieChild(t *testing.T) (*exec.Cmd, func(), *process.Process) {
	t.Helper()
	cmd := exec.Command("cat")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Wait() // an error if the test reaped it already
	})
	p, err := process.Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return cmd, func() { stdin.Close() }, p
}

// newWatcher starts an exit watcher of the test's own, closed when the
// test ends, and reports on the channel, per pid, the watches that fell
// back to checking for the reap on a backoff.
func newWatcher(t *testing.T) (*exits, <-chan int) {
	t.Helper()
	ch := make(chan int, 16)
	x, err := newExits(func(pid int) { ch <- pid })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(x.close)
	return x, ch
}

// waitZombie waits until pid is a zombie, as /proc says.
func waitZombie(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			t.Fatal(err)
		}
		if i := bytes.LastIndexByte(data, ')'); i > 0 && bytes.HasPrefix(data[i+1:], []byte(" Z")) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d is not a zombie after 30s: %s", pid, data)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestExitWaitsForReap: a container whose process exited is forgotten
// only once it is reaped, and then even if no kernel wake-up comes at the
// reap (before Linux 6.9 none does). The watcher's fallback is forced: the
// child stays a zombie until the watcher said it saw it so.
func TestExitWaitsForReap(t *testing.T) {
	t.Parallel()
	x, zombies := newWatcher(t)
	cmd, exitNow, p := zombieChild(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	exit, err := watchExit(ctx, x, p)
	if err != nil {
		t.Fatal(err)
	}
	exitNow()
	waitZombie(t, p.PID)
	select {
	case pid := <-zombies:
		if pid != p.PID {
			t.Fatalf("fallback for pid %d, want %d", pid, p.PID)
		}
	case <-exit:
		t.Fatal("exit reported before the process was reaped")
	case <-time.After(30 * time.Second):
		t.Fatal("the watcher never saw the process exit")
	}
	// The watcher saw the zombie and decided it was not gone yet.
	select {
	case <-exit:
		t.Fatal("exit reported before the process was reaped")
	default:
	}
	start := time.Now()
	cmd.Wait()
	select {
	case <-exit:
		t.Logf("reap seen %s after it", time.Since(start))
	case <-time.After(30 * time.Second):
		t.Fatal("the reap was never seen")
	}
}

// TestExitOfZombieAtStart: a process that is already a zombie when the
// watch begins takes the same fallback.
func TestExitOfZombieAtStart(t *testing.T) {
	t.Parallel()
	x, zombies := newWatcher(t)
	cmd, exitNow, p := zombieChild(t)
	exitNow()
	waitZombie(t, p.PID)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	exit, err := watchExit(ctx, x, p)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-zombies:
	case <-time.After(30 * time.Second):
		t.Fatal("the watcher never saw the zombie")
	}
	cmd.Wait()
	select {
	case <-exit:
	case <-time.After(30 * time.Second):
		t.Fatal("the reap was never seen")
	}
}

// watchExit returns a channel closed when x reports p gone.
func watchExit(ctx context.Context, x *exits, p *process.Process) (<-chan struct{}, error) {
	ch := make(chan struct{})
	return ch, x.watch(ctx, p, func() { close(ch) })
}
