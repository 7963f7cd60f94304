package refresh

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/process"
)

// exits tells when the containers' processes exit: one epoll set of every
// container's pidfd (readable once its process exits), waited on by one
// goroutine. A goroutine per container parked on its pidfd cost a stack
// and an *os.File each: about 7 MiB at 1,000 containers.
type exits struct {
	epfd int
	wake int // eventfd: ends wait

	mu      sync.Mutex
	waiters map[int32]chan struct{} // by the watcher's own dup of the pidfd
	closed  bool
}

func newExits() (*exits, error) {
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
		unix.Close(epfd)
		unix.Close(wake)
		return nil, fmt.Errorf("epoll_ctl: %w", err)
	}
	return &exits{epfd: epfd, wake: wake, waiters: map[int32]chan struct{}{}}, nil
}

// watch returns a channel closed when p exits. It stops watching when ctx
// ends (the channel then stays open).
func (x *exits) watch(ctx context.Context, p *process.Process) (<-chan struct{}, error) {
	fd, err := unix.FcntlInt(uintptr(p.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup pidfd: %w", err)
	}
	ch := make(chan struct{})
	x.mu.Lock()
	if x.closed {
		x.mu.Unlock()
		unix.Close(fd)
		return nil, errors.New("refresher stopping")
	}
	x.waiters[int32(fd)] = ch
	if err := unix.EpollCtl(x.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}); err != nil {
		delete(x.waiters, int32(fd))
		x.mu.Unlock()
		unix.Close(fd)
		return nil, fmt.Errorf("epoll_ctl pidfd: %w", err)
	}
	x.mu.Unlock()
	context.AfterFunc(ctx, func() {
		x.mu.Lock()
		defer x.mu.Unlock()
		if x.waiters[int32(fd)] == ch {
			x.drop(fd)
		}
	})
	return ch, nil
}

// drop forgets fd; x.mu is held.
func (x *exits) drop(fd int) {
	delete(x.waiters, int32(fd))
	unix.EpollCtl(x.epfd, unix.EPOLL_CTL_DEL, fd, nil)
	unix.Close(fd)
}

// run waits for exits until stop is called, in a thread of its own (it
// blocks in epoll_wait).
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
		x.mu.Lock()
		for _, ev := range events[:n] {
			fd := int(ev.Fd)
			if fd == x.wake {
				x.closeLocked()
				x.mu.Unlock()
				return
			}
			ch, ok := x.waiters[ev.Fd]
			// An event may name a descriptor that was dropped, and whose
			// number a new watch reused, since epoll_wait returned: only
			// a process that is gone counts.
			if !ok || !errors.Is(unix.PidfdSendSignal(fd, 0, nil, 0), unix.ESRCH) {
				continue
			}
			x.drop(fd)
			close(ch)
		}
		x.mu.Unlock()
	}
}

// stop ends run and releases every descriptor.
func (x *exits) stop() {
	var one [8]byte
	one[0] = 1
	unix.Write(x.wake, one[:])
}

func (x *exits) closeLocked() {
	for fd := range x.waiters {
		x.drop(int(fd))
	}
	x.closed = true
	unix.Close(x.epfd)
	unix.Close(x.wake)
}
