// Package subreaper lets a test harness that starts daemonizing runtimes
// (conmon, containerd's shims) own what they leave behind. PID 1 on the
// test machines does not reap orphans, so the harness makes itself a child
// subreaper: every daemonized process is reparented to it, and it kills
// and reaps them when it ends. test/cri and test/cluster share it.
package subreaper

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Main is a harness's TestMain: it makes the test binary the subreaper,
// runs the tests, and fails the run when a process outlived them (every
// test stops what it started, so an orphan is a leak), after killing it.
// harness prefixes its lines (cri, cluster).
func Main(m *testing.M, harness string) {
	if err := Become(); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", harness, err)
		os.Exit(1)
	}
	code := m.Run()
	if left := KillOrphans(nil); len(left) > 0 && code == 0 {
		fmt.Fprintf(os.Stderr, "%s: processes outlived the tests (killed): %q\n", harness, left)
		code = 1
	}
	os.Exit(code)
}

// Become makes the calling process the reaper of its descendants' orphans.
func Become() error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("PR_SET_CHILD_SUBREAPER: %w", err)
	}
	return nil
}

// Reap collects the exited children that no exec.Cmd waits for: those
// not in tracked (the pids the harness Waits for itself).
func Reap(tracked map[int]bool) {
	for _, pid := range children() {
		if _, state := stat(pid); state == 'Z' && !tracked[pid] {
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		}
	}
}

// KillOrphans kills and reaps every child not in tracked that is still
// there (shims, conmons, containers reparented here), and returns their
// command lines: what outlived the harness.
func KillOrphans(tracked map[int]bool) []string {
	var killed []string
	for range 50 {
		Reap(tracked)
		var live []int
		for _, pid := range children() {
			if _, state := stat(pid); state != 'Z' && state != 0 && !tracked[pid] {
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
	Reap(tracked)
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
