package bench

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/render"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// Part 3: the refresher at scale, against the fake agent.

type scaleResult struct {
	N                      int
	Startup                time.Duration // refresher start until every container's files were rewritten once
	Mem, MemAfter          mem
	IdleCPU                time.Duration // CPU per minute, idle
	RotationCPU            time.Duration // CPU per rotation (mean)
	Rotation               stat          // Rotate() to files rewritten, every container, every rotation
	RotationP99PerRotation []time.Duration
}

func benchRefresher(t *testing.T, b bins, n int, res *results) scaleResult {
	out := scaleResult{N: n}
	dir := testhelp.ShortTempDir(t, "brf-")
	state := filepath.Join(dir, "state")
	testhelp.MountTmpfs(t, state, "mode=0700,size=256m")
	socket := filepath.Join(dir, "admin.sock")
	fake := fakeagent.Start(t, trustDomain, socket)
	workload := spiffeid.RequireFromString(workloadID)
	fake.Default = []spiffeid.ID{workload}
	store := statedir.Store{Dir: state}
	if err := store.Init(); err != nil {
		t.Fatal(err)
	}

	progress("refresher at %d containers: starting %d sleep processes and writing their records", n, n)
	pids := make([]int, n)
	for i := range n {
		cmd := exec.Command("sleep", "3600")
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatalf("starting sleep %d: %v (ulimit -n / -u?)", i, err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		pids[i] = cmd.Process.Pid
	}
	// One fetch; every container gets the same files (the refresher
	// rewrites them all with its own stream's SVIDs at once anyway).
	ds, err := annotations.Parse(annotation, annValue)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := agent.New(socket)
	if err != nil {
		t.Fatal(err)
	}
	update, bundles, err := client.FetchX509(ctx, pids[0], agent.Wait{})
	client.Close()
	if err != nil {
		t.Fatal(err)
	}
	d := statedir.Delivery{Delivery: ds[0], Delivered: update.SVIDs[0].ID.String()}
	fs, err := render.Delivery(ds[0], render.Input{SVID: update.SVIDs[0], Bundles: bundles})
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]string, n)
	dirs := make([]string, n)
	for i, pid := range pids {
		ids[i] = fmt.Sprintf("bench-%d", i)
		dirs[i] = store.DeliveryDir(ids[i], 0)
		st, err := process.StartTime(pid)
		if err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(store.ContainerDir(ids[i]), 0o700)
		if err := (files.Writer{}).Write(dirs[i], fs, files.Owner{}); err != nil {
			t.Fatal(err)
		}
		rec := statedir.Record{ID: ids[i], PID: pid, StartTime: st, AgentSocket: socket, Deliveries: []statedir.Delivery{d}, Created: time.Now().UTC()}
		if err := store.Save(rec); err != nil {
			t.Fatal(err)
		}
	}
	poll.Eventually(t, 5*time.Second, "the setup fetch's streams closed", func() bool { return fake.SVIDStreams() == 0 })

	// Every ..data swap is an IN_MOVED_TO ("create") of dir/..data.
	w := newSwapWatcher(t, dirs)

	config := filepath.Join(dir, "config.yaml")
	writeFile(t, config, fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\n", socket, state))
	start := time.Now()
	r := startRefresher(t, b.refresher, config, dir)
	poll.Eventually(t, 120*time.Second, "every container served and rewritten once", func() bool {
		return fake.SVIDStreams() == int64(n) && w.allSince(start)
	})
	out.Startup = time.Since(start)
	progress("refresher at %d containers: all served after %s; settling, then %s idle", n, out.Startup.Round(time.Millisecond), res.Idle)
	time.Sleep(3 * time.Second)
	out.Mem = readMem(t, r.Process.Pid)
	progress("refresher at %d containers: served: RSS %.1f MiB, peak so far %.1f MiB; %s", n, float64(out.Mem.RSS)/1024, float64(out.Mem.HWM)/1024, goMemory(filepath.Join(state, "refresher.sock")))
	out.IdleCPU = idleCPU(t, r.Process.Pid, res.Idle)

	var all []time.Duration
	var cpu time.Duration
	for k := range res.Rotations {
		before := make([][]byte, n)
		for i, dir := range dirs {
			f, err := files.Read(dir, "svid.pem")
			if err != nil {
				t.Fatal(err)
			}
			before[i] = f["svid.pem"]
		}
		cpu0 := cpuTime(t, r.Process.Pid)
		t0 := time.Now()
		fake.Rotate()
		poll.Eventually(t, 60*time.Second, "every container rewritten after Rotate", func() bool { return w.allSince(t0) })
		lat := w.latencies(t0)
		cpu += cpuTime(t, r.Process.Pid) - cpu0
		for i, dir := range dirs {
			f, err := files.Read(dir, "svid.pem", "svid_key.pem")
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(f["svid.pem"], before[i]) {
				t.Fatalf("%s: the rewrite after Rotate kept the old certificate", ids[i])
			}
			if _, err := x509svid.Parse(f["svid.pem"], f["svid_key.pem"]); err != nil {
				t.Fatalf("%s: rotated files do not form an SVID: %v", ids[i], err)
			}
		}
		rs := stat{Samples: lat}
		out.RotationP99PerRotation = append(out.RotationP99PerRotation, rs.P(0.99))
		progress("refresher at %d containers: rotation %d: p50 %s p99 %s max %s", n, k+1, rs.Median().Round(time.Millisecond), rs.P(0.99).Round(time.Millisecond), rs.Max().Round(time.Millisecond))
		all = append(all, lat...)
		time.Sleep(time.Second)
	}
	out.Rotation = stat{Samples: all}
	if res.Rotations > 0 {
		out.RotationCPU = cpu / time.Duration(res.Rotations)
	}
	out.MemAfter = readMem(t, r.Process.Pid)
	progress("refresher at %d containers: after rotations: peak %.1f MiB; %s", n, float64(out.MemAfter.HWM)/1024, goMemory(filepath.Join(state, "refresher.sock")))
	if got := fake.SVIDStreams(); got != int64(n) {
		t.Fatalf("%d SVID streams open at the end, want %d", got, n)
	}
	w.close()
	return out
}

// startRefresher runs the refresher binary and waits for its readiness
// notification (sent after its first scan), as test/e2e does.
func startRefresher(t *testing.T, bin, config, dir string) *exec.Cmd {
	t.Helper()
	return startRefresherArgs(t, []string{bin}, config, dir)
}

// startRefresherArgs is startRefresher with the refresher's command line
// before --config (a wrapper, then the binary).
func startRefresherArgs(t *testing.T, argv []string, config, dir string) *exec.Cmd {
	t.Helper()
	notify := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	logf, err := os.Create(filepath.Join(dir, "refresher.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], append(argv[1:], "--config", config)...)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
	// BENCH_REFRESHER_ENV (e.g. "GOMEMLIMIT=40MiB") reaches the refresher only.
	cmd.Env = append(cmd.Env, strings.Fields(os.Getenv("BENCH_REFRESHER_ENV"))...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	buf := make([]byte, 256)
	m, _, err := conn.ReadFromUnix(buf)
	if err != nil || !strings.Contains(string(buf[:m]), "READY=1") {
		log, _ := os.ReadFile(filepath.Join(dir, "refresher.log"))
		t.Fatalf("no READY=1 from the refresher (%v); log:\n%s", err, log)
	}
	return cmd
}

// swapWatcher timestamps every ..data swap in a set of delivery directories.
type swapWatcher struct {
	w      *fsnotify.Watcher
	index  map[string]int
	mu     sync.Mutex
	events [][]time.Time
	done   chan struct{}
}

func newSwapWatcher(t *testing.T, dirs []string) *swapWatcher {
	t.Helper()
	fw, err := fsnotify.NewBufferedWatcher(4096)
	if err != nil {
		t.Fatal(err)
	}
	s := &swapWatcher{w: fw, index: map[string]int{}, events: make([][]time.Time, len(dirs)), done: make(chan struct{})}
	for i, d := range dirs {
		s.index[d] = i
		if err := fw.Add(d); err != nil {
			t.Fatalf("inotify on %s: %v (fs.inotify.max_user_watches?)", d, err)
		}
	}
	go func() {
		defer close(s.done)
		for {
			select {
			case ev, ok := <-fw.Events:
				if !ok {
					return
				}
				now := time.Now()
				if filepath.Base(ev.Name) != files.DataLink || !ev.Has(fsnotify.Create) {
					continue
				}
				if i, ok := s.index[filepath.Dir(ev.Name)]; ok {
					s.mu.Lock()
					s.events[i] = append(s.events[i], now)
					s.mu.Unlock()
				}
			case err, ok := <-fw.Errors:
				if !ok {
					return
				}
				progress("inotify: %v", err)
			}
		}
	}()
	return s
}

func (s *swapWatcher) first(i int, since time.Time) (time.Time, bool) {
	for _, e := range s.events[i] {
		if !e.Before(since) {
			return e, true
		}
	}
	return time.Time{}, false
}

func (s *swapWatcher) allSince(since time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range s.events {
		if _, ok := s.first(i, since); !ok {
			return false
		}
	}
	return true
}

func (s *swapWatcher) latencies(since time.Time) []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]time.Duration, len(s.events))
	for i := range s.events {
		e, _ := s.first(i, since)
		out[i] = e.Sub(since)
	}
	return out
}

func (s *swapWatcher) close() {
	s.w.Close()
	<-s.done
}

// ---------------------------------------------------------------------
// /proc readings.

// mem is a process's memory as /proc tells it.
type mem struct {
	RSS, HWM, PSS, Private int64 // KiB
	Threads                int
}

func readMem(t *testing.T, pid int) mem {
	t.Helper()
	var m mem
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := procValues(status)
	m.RSS, m.HWM, m.Threads = s["VmRSS:"], s["VmHWM:"], int(s["Threads:"])
	if rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid)); err == nil {
		r := procValues(rollup)
		m.PSS, m.Private = r["Pss:"], r["Private_Clean:"]+r["Private_Dirty:"]
	}
	return m
}

// procValues reads the "Name: value [kB]" lines of a /proc file (status,
// smaps_rollup) into their values by name, colon included.
func procValues(data []byte) map[string]int64 {
	values := map[string]int64{}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		values[f[0]], _ = strconv.ParseInt(f[1], 10, 64)
	}
	return values
}

// cpuTicks is utime+stime of pid, in clock ticks.
func cpuTicks(t *testing.T, pid int) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.LastIndexByte(data, ')')
	f := bytes.Fields(data[i+1:])
	// f[0] is field 3; utime and stime are fields 14 and 15.
	u, _ := strconv.ParseInt(string(f[14-3]), 10, 64)
	s, _ := strconv.ParseInt(string(f[15-3]), 10, 64)
	return u + s
}

func ticksToDuration(ticks int64) time.Duration {
	return time.Duration(ticks) * time.Second / clkTck
}

// cpuTime is pid's CPU time: the sum of its threads' run time from
// /proc/PID/task/*/schedstat (nanoseconds), or utime+stime from
// /proc/PID/stat (10 ms ticks) where schedstat is missing.
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	var sum int64
	ok := len(tasks) > 0
	for _, p := range tasks {
		data, err := os.ReadFile(p)
		f := strings.Fields(string(data))
		if err != nil || len(f) < 1 {
			ok = false
			break
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		sum += n
	}
	if ok {
		return time.Duration(sum)
	}
	return ticksToDuration(cpuTicks(t, pid))
}

// idleCPU samples pid's CPU time over window and scales it to a minute.
func idleCPU(t *testing.T, pid int, window time.Duration) time.Duration {
	t.Helper()
	t0 := cpuTime(t, pid)
	start := time.Now()
	time.Sleep(window)
	used := cpuTime(t, pid) - t0
	return time.Duration(float64(used) * float64(time.Minute) / float64(time.Since(start)))
}
