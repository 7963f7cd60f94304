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

	"github.com/noderesource/spiffe-oci-hook/test/subreaper"
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
func BecomeSubreaper() error { return subreaper.Become() }

// tracked is the daemons' pids: their own Wait collects them.
func (c *Cluster) tracked() map[int]bool {
	pids := map[int]bool{}
	for _, p := range c.procs {
		pids[p.cmd.Process.Pid] = true
	}
	return pids
}

// killOrphans kills and reaps every untracked child still there (shims,
// conmons, containers reparented here) and returns their command lines.
func (c *Cluster) killOrphans() []string { return subreaper.KillOrphans(c.tracked()) }

// Reap collects the daemons' exited intermediates (for a long-running
// launcher).
func (c *Cluster) Reap() { subreaper.Reap(c.tracked()) }
