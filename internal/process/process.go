// Package process pins a container's process with a pidfd, so that a pid
// number that is reused by another process cannot be handed someone else's
// identity.
package process

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Process is a live process held by a pidfd.
type Process struct {
	PID int
	// StartTime is the process's start time in clock ticks after boot
	// (field 22 of /proc/PID/stat). Together with PID it names one process
	// across restarts of whoever recorded it, where a pidfd cannot be kept.
	StartTime uint64
	fd        int
}

// ErrGone means the process exited (or its pid now belongs to another one).
var ErrGone = errors.New("process is gone")

// Open pins pid with a pidfd and reads its start time.
func Open(pid int) (*Process, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("pid %d is not a process", pid)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("pid %d: %w", pid, ErrGone)
		}
		return nil, fmt.Errorf("pidfd_open(%d): %w", pid, err)
	}
	p := &Process{PID: pid, fd: fd}
	st, err := StartTime(pid)
	if err != nil {
		p.Close()
		return nil, err
	}
	p.StartTime = st
	// The stat read above belongs to the pinned process only if it was
	// still alive afterwards.
	if err := p.Alive(); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// OpenRecorded pins pid only if it is still the process that was recorded
// with startTime; otherwise it returns ErrGone.
func OpenRecorded(pid int, startTime uint64) (*Process, error) {
	p, err := Open(pid)
	if err != nil {
		return nil, err
	}
	if p.StartTime != startTime {
		p.Close()
		return nil, fmt.Errorf("pid %d was reused by another process: %w", pid, ErrGone)
	}
	return p, nil
}

// FD returns the pidfd. It becomes readable when the process exits.
func (p *Process) FD() int { return p.fd }

// Alive returns nil while the pinned process has not been reaped, and ErrGone after.
func (p *Process) Alive() error {
	err := unix.PidfdSendSignal(p.fd, 0, nil, 0)
	switch {
	// EPERM: the process exists (the kernel finds it before it checks the
	// permission to signal it), but this caller may not signal it. That is
	// the refresher under its unit, which keeps no CAP_KILL, watching a
	// container that runs as another uid.
	case err == nil, errors.Is(err, unix.EPERM):
		return nil
	case errors.Is(err, unix.ESRCH):
		return fmt.Errorf("pid %d: %w", p.PID, ErrGone)
	default:
		return fmt.Errorf("pidfd_send_signal(%d): %w", p.PID, err)
	}
}

// Close releases the pidfd.
func (p *Process) Close() error {
	if p.fd < 0 {
		return nil
	}
	err := unix.Close(p.fd)
	p.fd = -1
	return err
}

// StartTime reads a process's start time from /proc/PID/stat.
func StartTime(pid int) (uint64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, fmt.Errorf("pid %d: %w", pid, ErrGone)
		}
		return 0, fmt.Errorf("reading start time of pid %d: %w", pid, err)
	}
	// The command name (field 2) is in parentheses and may hold spaces or
	// parentheses itself; the fields after the last ')' are plain.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, fmt.Errorf("pid %d: unexpected /proc stat format", pid)
	}
	fields := bytes.Fields(data[i+1:])
	// fields[0] is field 3 (state); start time is field 22.
	const startTimeIndex = 22 - 3
	if len(fields) <= startTimeIndex {
		return 0, fmt.Errorf("pid %d: unexpected /proc stat format", pid)
	}
	st, err := strconv.ParseUint(string(fields[startTimeIndex]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("pid %d: parsing start time: %w", pid, err)
	}
	return st, nil
}

// Signal sends sig to the pinned process through its pidfd: to this
// process, never to another that has since been given its number.
func (p *Process) Signal(sig unix.Signal) error {
	err := unix.PidfdSendSignal(p.fd, sig, nil, 0)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ESRCH):
		return fmt.Errorf("pid %d: %w", p.PID, ErrGone)
	default:
		return fmt.Errorf("pidfd_send_signal(%d, %s): %w", p.PID, unix.SignalName(sig), err)
	}
}
