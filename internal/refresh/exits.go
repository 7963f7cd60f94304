package refresh

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/process"
)

// Container exits are told by one epoll set of every served container's
// pidfd, waited on by one goroutine for the whole process. A goroutine per
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
var (
	reapPollMin = 5 * time.Millisecond
	reapPollMax = time.Second
	// onZombie, when set (tests), is called with the pid when the watcher
	// saw the process exited but not yet reaped.
	onZombie func(pid int)
)

type exits struct {
	epfd int

	mu      sync.Mutex
	waiters map[int32]*waiter // by the watcher's own dup of the pidfd
}

type waiter struct {
	pid    int
	exited func() // called once, without x.mu held
	done   bool   // exited called, or the watch ended
}

var (
	sharedExits     *exits
	sharedExitsErr  error
	sharedExitsOnce sync.Once
)

// onExit calls exited, on a goroutine of the watcher's, when p has exited
// and been reaped; it stops watching when ctx ends (exited is then never
// called). No goroutine waits per process: a container's own goroutine
// is free to block in its SVID stream.
func onExit(ctx context.Context, p *process.Process, exited func()) error {
	sharedExitsOnce.Do(func() {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			sharedExitsErr = fmt.Errorf("epoll_create1: %w", err)
			return
		}
		sharedExits = &exits{epfd: epfd, waiters: map[int32]*waiter{}}
		go sharedExits.run()
	})
	if sharedExitsErr != nil {
		return sharedExitsErr
	}
	return sharedExits.watch(ctx, p, exited)
}

func (x *exits) watch(ctx context.Context, p *process.Process, exited func()) error {
	fd, err := unix.FcntlInt(uintptr(p.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("dup pidfd: %w", err)
	}
	w := &waiter{pid: p.PID, exited: exited}
	x.mu.Lock()
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

// run waits for exits for as long as the process lives, in a thread of
// its own (it blocks in epoll_wait).
func (x *exits) run() {
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
		x.mu.Lock()
		for _, ev := range events[:n] {
			fd := int(ev.Fd)
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
				if onZombie != nil {
					onZombie(w.pid)
				}
				go x.watchReap(fd, w)
			}
		}
		x.mu.Unlock()
		for _, w := range gone {
			w.exited()
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
