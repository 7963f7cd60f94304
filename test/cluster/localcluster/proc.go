package localcluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// proc is one daemon of the cluster, its output in logs/<name>.log.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// start runs bin with args, output to the cluster's log directory.
func (c *Cluster) start(name, bin string, args ...string) (*proc, error) {
	log := filepath.Join(c.Dir, "logs", name+".log")
	f, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	// Not in the launcher's process group: a ^C at `make cluster` must not
	// reach the daemons before the launcher stops them in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: log, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	c.procs = append(c.procs, p)
	return p, nil
}

// exited reports whether p has stopped.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits up to d, then kills.
func (p *proc) stop(d time.Duration) error {
	if p.exited() {
		return nil
	}
	p.cmd.Process.Signal(unix.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(d):
		p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s did not stop within %s of SIGTERM (killed)", p.name, d)
	}
}

// Tail returns the last n lines of a file (a daemon's log).
func Tail(path string, n int) string {
	data, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// BecomeSubreaper makes this process the reaper of every daemon's
// orphans (conmon and the containerd shims daemonize; PID 1 here does
// not reap), so that Down can find and stop them.
func BecomeSubreaper() error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("PR_SET_CHILD_SUBREAPER: %w", err)
	}
	return nil
}

// reapZombies collects exited children that no exec.Cmd waits for
// (daemons' intermediate processes reparented here), leaving the tracked
// daemons to their own Wait.
func (c *Cluster) reapZombies() {
	tracked := map[int]bool{}
	for _, p := range c.procs {
		tracked[p.cmd.Process.Pid] = true
	}
	for _, pid := range children() {
		if _, state := stat(pid); state == 'Z' && !tracked[pid] {
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		}
	}
}

// killOrphans kills and reaps every untracked child still there (shims,
// conmons, containers reparented here) and returns their command lines.
func (c *Cluster) killOrphans() []string {
	var killed []string
	for range 50 {
		c.reapZombies()
		var live []int
		for _, pid := range children() {
			if _, state := stat(pid); state != 'Z' && state != 0 {
				live = append(live, pid)
			}
		}
		if len(live) == 0 {
			break
		}
		for _, pid := range live {
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			unix.Kill(pid, unix.SIGKILL)
			killed = append(killed, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(strings.TrimRight(string(cmdline), "\x00"), "\x00", " ")))
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.reapZombies()
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
		if pp, _ := stat(pid); pp == self {
			pids = append(pids, pid)
		}
	}
	return pids
}

// stat reads the parent pid and state from /proc/pid/stat (after the
// parenthesized command name, which may hold spaces).
func stat(pid int) (int, byte) {
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

// Reap collects the daemons' exited intermediates (for a long-running
// launcher).
func (c *Cluster) Reap() { c.reapZombies() }
