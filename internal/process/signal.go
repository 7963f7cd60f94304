package process

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Forwarders are the init wrappers known to pass every signal they get on
// to their child, by the name the kernel gives their process: tini (and
// docker run --init, which runs it as docker-init), catatonit (podman run
// --init bind-mounts it as /run/podman-init), dumb-init. Signalling one is
// signalling its child.
var Forwarders = []string{"tini", "tini-static", "docker-init", "catatonit", "podman-init", "dumb-init"}

// disposition is what a process does with one signal.
type disposition struct {
	comm     string
	nsInit   bool // the init of its innermost PID namespace
	handled  bool // a handler, or blocked (read with signalfd or sigwait)
	ignored  bool
	children []int
}

func readDisposition(pid int, sig unix.Signal) (disposition, error) {
	var d disposition
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return d, fmt.Errorf("reading /proc/%d/status: %w", pid, err)
	}
	bit := uint64(1) << (uint(sig) - 1)
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		value = strings.TrimSpace(value)
		switch key {
		case "Name":
			d.comm = value
		case "NSpid":
			f := strings.Fields(value)
			d.nsInit = len(f) > 1 && f[len(f)-1] == "1"
		case "SigCgt", "SigBlk", "SigIgn":
			mask, err := strconv.ParseUint(value, 16, 64)
			if err != nil {
				return d, fmt.Errorf("/proc/%d/status %s: %w", pid, key, err)
			}
			if mask&bit != 0 {
				if key == "SigIgn" {
					d.ignored = true
				} else {
					d.handled = true
				}
			}
		}
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range tasks {
		data, _ := os.ReadFile(t)
		for _, f := range strings.Fields(string(data)) {
			if c, err := strconv.Atoi(f); err == nil {
				d.children = append(d.children, c)
			}
		}
	}
	return d, nil
}

// killedBy reports whether sig's default action ends a process.
func killedBy(sig unix.Signal) bool {
	switch sig {
	case unix.SIGCHLD, unix.SIGURG, unix.SIGWINCH, unix.SIGCONT:
		return false
	}
	return true
}

// SignalRisk tells whether sending sig to pid from outside its PID
// namespace would end a process that has no use for it, and how: "" when
// it would not. The kernel drops a signal a PID namespace's init has no
// handler for, so an application that is its container's init is safe.
// It is not when it is not the init (a pod sharing its process namespace,
// host PID), or when the init is a wrapper (Forwarders) that passes the
// signal on to an application without a handler.
func SignalRisk(pid int, sig unix.Signal) (string, error) {
	if !killedBy(sig) {
		return "", nil
	}
	d, err := readDisposition(pid, sig)
	if err != nil {
		return "", err
	}
	name := unix.SignalName(sig)
	switch {
	case d.ignored:
		return "", nil
	case !d.handled && !d.nsInit:
		return fmt.Sprintf("pid %d (%s) is not its PID namespace's init (a shared process namespace, or host PID) and has no handler for %s: the signal would kill it", pid, d.comm, name), nil
	case !d.handled:
		return "", nil // the kernel drops it
	}
	forwarder := false
	for _, f := range Forwarders {
		if d.comm == f {
			forwarder = true
		}
	}
	if !forwarder {
		return "", nil
	}
	for _, c := range d.children {
		cd, err := readDisposition(c, sig)
		if err != nil {
			continue // exited meanwhile
		}
		if !cd.handled && !cd.ignored {
			return fmt.Sprintf("pid %d is %s, an init wrapper that forwards %s to pid %d (%s), which has no handler for it: the signal would kill the application", pid, d.comm, name, c, cd.comm), nil
		}
	}
	return "", nil
}
