package refresh

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/process"
)

// Container exits are told by one epoll set of every served container's
// pidfd, waited on by one goroutine for the whole refresher. A goroutine per
// container parked on its pidfd cost a stack and an *os.File each: about
// 7 MiB at 1,000 containers (BENCHMARKS.md).
//
// The pidfd becomes readable when the process exits and turns into a
// zombie, before its parent (conmon, a shim, runc) reaps it, and only from
// Linux 6.9 does the kernel wake pollers again at the reap. A readable
// pidfd whose process is not reaped yet therefore leaves the epoll set
// (level-triggered, it would wake the loop without end) and is checked for
// the reap on a short backoff by a goroutine of its own, for the moments
// a zombie lasts.

// Reap backoff: a zombie is normally reaped within milliseconds of its
// exit; a parent that is slow to reap costs a check a second at most.
const (
	reapPollMin = 5 * time.Millisecond
	reapPollMax = time.Second
)

// exits is the exit watcher of one Refresher's containers. Run starts it
// with its first container and closes it when it returns, so that a
// refresher leaves no epoll set, thread or goroutine behind (and tests,
// each with a refresher of its own, share none).
type exits struct {
	epfd int
	// wake is an eventfd in the epoll set: close writes it to end run,
	// which is blocked in epoll_wait.
	wake int
	// onZombie is called with the pid when the watcher saw a process
	// exited but not yet reaped: the seam of exit_test.go.
	onZombie func(pid int)
	// stopped is closed when run has returned.
	stopped chan struct{}

	mu      sync.Mutex
	closed  bool
	waiters map[int32]*waiter // by the watcher's own dup of the pidfd
}

type waiter struct {
	pid    int
	exited func() // called once, without x.mu held
	done   bool   // exited called, or the watch ended
}

// newExits starts an exit watcher; close ends it.
func newExits(onZombie func(pid int)) (*exits, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}); err != nil {
		unix.Close(wake)
		unix.Close(epfd)
		return nil, fmt.Errorf("epoll_ctl eventfd: %w", err)
	}
	x := &exits{epfd: epfd, wake: wake, onZombie: onZombie, stopped: make(chan struct{}), waiters: map[int32]*waiter{}}
	go x.run()
	return x, nil
}

// onExit calls exited, on a goroutine of the watcher's, when p has exited
// and been reaped; it stops watching when ctx ends (exited is then never
// called). No goroutine waits per process: a container's own goroutine
// is free to block in its SVID stream. The watcher is started with the
// first container; an error starting it is the container's, and the next
// container tries again.
func (r *Refresher) onExit(ctx context.Context, p *process.Process, exited func()) error {
	r.exitsMu.Lock()
	if r.exits == nil {
		x, err := newExits(func(int) {})
		if err != nil {
			r.exitsMu.Unlock()
			return err
		}
		r.exits = x
	}
	x := r.exits
	r.exitsMu.Unlock()
	return x.watch(ctx, p, exited)
}

// closeExits ends the exit watcher, if one was started. Run calls it once
// every container's goroutine has returned, so none watches any more.
func (r *Refresher) closeExits() {
	r.exitsMu.Lock()
	x := r.exits
	r.exits = nil
	r.exitsMu.Unlock()
	if x != nil {
		x.close()
	}
}

// close stops watching every process (their exited is never called),
// ends run, and closes the epoll set and the eventfd once run is out of
// epoll_wait: only then can their numbers not be reused under it. It is
// called once.
func (x *exits) close() {
	x.mu.Lock()
	x.closed = true
	for fd := range x.waiters {
		x.drop(int(fd))
	}
	x.mu.Unlock()
	// An eventfd write fails only when its counter would overflow; this
	// is its only write.
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	unix.Write(x.wake, one[:])
	<-x.stopped
	unix.Close(x.epfd)
	unix.Close(x.wake)
}

func (x *exits) watch(ctx context.Context, p *process.Process, exited func()) error {
	fd, err := unix.FcntlInt(uintptr(p.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("dup pidfd: %w", err)
	}
	w := &waiter{pid: p.PID, exited: exited}
	x.mu.Lock()
	if x.closed {
		x.mu.Unlock()
		unix.Close(fd)
		return errors.New("exit watcher closed: the refresher is stopping")
	}
	x.waiters[int32(fd)] = w
	if err := unix.EpollCtl(x.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}); err != nil {
		delete(x.waiters, int32(fd))
		x.mu.Unlock()
		unix.Close(fd)
		return fmt.Errorf("epoll_ctl pidfd: %w", err)
	}
	x.mu.Unlock()
	context.AfterFunc(ctx, func() {
		x.mu.Lock()
		defer x.mu.Unlock()
		if x.waiters[int32(fd)] == w {
			x.drop(fd)
		}
	})
	return nil
}

// drop forgets fd; x.mu is held. A waiter whose zombie is being watched
// (watchReap) is marked done, so that it stops.
func (x *exits) drop(fd int) {
	if w := x.waiters[int32(fd)]; w != nil {
		w.done = true
	}
	delete(x.waiters, int32(fd))
	unix.EpollCtl(x.epfd, unix.EPOLL_CTL_DEL, fd, nil)
	unix.Close(fd)
}

// run waits for exits until close wakes it, in a thread of its own (it
// blocks in epoll_wait).
func (x *exits) run() {
	defer close(x.stopped)
	events := make([]unix.EpollEvent, 64)
	for {
		n, err := unix.EpollWait(x.epfd, events, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return
		}
		var gone []*waiter
		stop := false
		x.mu.Lock()
		for _, ev := range events[:n] {
			fd := int(ev.Fd)
			if fd == x.wake {
				stop = true
				continue
			}
			w, ok := x.waiters[ev.Fd]
			if !ok {
				continue // dropped since epoll_wait returned
			}
			switch {
			case reaped(fd):
				x.drop(fd)
				gone = append(gone, w)
			case readable(fd):
				// A zombie: out of the set, checked on a backoff.
				unix.EpollCtl(x.epfd, unix.EPOLL_CTL_DEL, fd, nil)
				x.onZombie(w.pid)
				go x.watchReap(fd, w)
			}
		}
		x.mu.Unlock()
		for _, w := range gone {
			w.exited()
		}
		if stop {
			return
		}
	}
}

// watchReap waits for an exited process to be reaped, checking on a
// backoff, until the watch ends (ctx) or the process is reaped.
func (x *exits) watchReap(fd int, w *waiter) {
	delay := reapPollMin
	for {
		time.Sleep(delay)
		x.mu.Lock()
		if w.done || x.waiters[int32(fd)] != w {
			x.mu.Unlock()
			return
		}
		if reaped(fd) {
			x.drop(fd)
			x.mu.Unlock()
			w.exited()
			return
		}
		x.mu.Unlock()
		delay = min(2*delay, reapPollMax)
	}
}

// reaped reports whether the pidfd's process is gone for good: signal 0
// reaches a zombie, and fails with ESRCH only once it was reaped.
func reaped(pidfd int) bool {
	return errors.Is(unix.PidfdSendSignal(pidfd, 0, nil, 0), unix.ESRCH)
}

// readable reports whether the pidfd polls readable: the process exited
// (it may still be a zombie).
func readable(pidfd int) bool {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0 && fds[0].Revents&(unix.POLLIN|unix.POLLHUP) != 0
}
