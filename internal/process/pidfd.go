package process

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
)

// FromPidfd takes over a pidfd that another process passed (package
// handoff: the hook hands the container's pinned process to the
// refresher). The pid is read from the pidfd itself, never taken from the
// sender's word: it is the pid as this process's /proc sees it. The
// process must still be alive after its start time is read, so that the
// pid and start time are the pidfd's process and not a successor that
// reused the number. On error fd is closed.
func FromPidfd(fd int) (*Process, error) {
	p := &Process{fd: fd}
	pid, err := pidfdPID(fd)
	if err != nil {
		p.Close()
		return nil, err
	}
	p.PID = pid
	if p.StartTime, err = StartTime(pid); err != nil {
		p.Close()
		return nil, err
	}
	if err := p.Alive(); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// pidfdPID reads the "Pid:" line of the pidfd's fdinfo. A file descriptor
// that is not a pidfd has none; a pidfd whose process exited reads -1, and
// one whose process is outside this pid namespace reads 0.
func pidfdPID(fd int) (int, error) {
	data, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
	if err != nil {
		return 0, fmt.Errorf("reading the pidfd's fdinfo: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		v, ok := bytes.CutPrefix(sc.Bytes(), []byte("Pid:"))
		if !ok {
			continue
		}
		pid, err := strconv.Atoi(string(bytes.TrimSpace(v)))
		switch {
		case err != nil:
			return 0, fmt.Errorf("the pidfd's fdinfo: Pid %q: %w", bytes.TrimSpace(v), err)
		case pid == -1:
			return 0, fmt.Errorf("pidfd: %w", ErrGone)
		case pid == 0:
			return 0, errors.New("pidfd: its process is not in this pid namespace")
		}
		return pid, nil
	}
	return 0, errors.New("the file descriptor passed is not a pidfd")
}
