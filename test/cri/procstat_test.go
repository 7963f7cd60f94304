package cri

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Process memory and CPU, from /proc, for the node benchmark.

// procMem is a process's memory in KiB.
type procMem struct{ rss, hwm, pss int64 }

func readProcMem(pid int) procMem {
	var m procMem
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	m.rss = kbField(status, "VmRSS:")
	m.hwm = kbField(status, "VmHWM:")
	rollup, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	m.pss = kbField(rollup, "Pss:")
	return m
}

func kbField(data []byte, key string) int64 {
	for _, line := range bytes.Split(data, []byte("\n")) {
		if f := strings.Fields(string(line)); len(f) >= 2 && f[0] == key {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v
		}
	}
	return 0
}

// procCPU is the CPU time (user + system, all threads) a process has used,
// from /proc/pid/stat in clock ticks (100 per second here).
func procCPU(pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(data, ')')
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+s) * 10 * time.Millisecond
}

// pidsByCmdline lists the processes whose command line starts with prefix
// and contains every one of words.
func pidsByCmdline(prefix string, words ...string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		c := strings.ReplaceAll(string(cmd), "\x00", " ")
		if !strings.HasPrefix(c, prefix) {
			continue
		}
		ok := true
		for _, w := range words {
			ok = ok && strings.Contains(c, w)
		}
		if ok {
			pids = append(pids, pid)
		}
	}
	return pids
}

// agentPID is the node's SPIRE agent's pid.
func (n *node) agentPID() int {
	pids := pidsByCmdline("", "spire-agent", "run", n.spire.Dir)
	if len(pids) != 1 {
		return 0
	}
	return pids[0]
}

func mibKB(kb int64) string { return fmt.Sprintf("%.1f MiB", float64(kb)/1024) }
