// Package testhelp holds the small helpers that several test packages
// used to carry copies of: polling for a condition, the repository root,
// a short temporary directory, a tmpfs state directory, summing a metric
// from the refresher's exposition, and a log buffer that goroutines may
// write to.
//
// It imports only the standard library and golang.org/x/sys, so that any
// test can import it, in-package tests under internal/ included: an
// import of this project's packages here could close an import cycle
// (internal/statedir's own tests importing testhelp importing a package
// that imports internal/statedir). Its name is not testutil, which
// prometheus/client_golang's test helpers, imported beside it, already use.
package testhelp

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"iter"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mainModule is the module RepoRoot looks for: the repository also holds
// the tools modules' go.mod files (test/spire, test/spire115, …).
const mainModule = "github.com/noderesource/spiffe-oci-hook"

// Eventually calls cond every 10 ms until it returns true, and fails t
// if timeout passes first, naming what it waited for.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	Poll{}.Eventually(t, timeout, what, cond)
}

// Poll is Eventually for a condition that costs more to check (a status
// request, a scrape: Every) or whose failure is only understood with what
// it saw (Explain).
type Poll struct {
	// Every is the pause between two calls of the condition; 10 ms if
	// zero.
	Every time.Duration
	// Explain, if set, describes the state the condition last saw; a
	// failure ends with it.
	Explain func() string
}

// Eventually calls cond every p.Every until it returns true, and fails t
// if timeout passes first. It returns how long it waited.
func (p Poll) Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	every := p.Every
	if every == 0 {
		every = 10 * time.Millisecond
	}
	start := time.Now()
	deadline := start.Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			msg := fmt.Sprintf("after %s, still waiting for: %s", timeout, what)
			if p.Explain != nil {
				msg += "; " + p.Explain()
			}
			t.Fatal(msg)
		}
		time.Sleep(every)
	}
	return time.Since(start)
}

// SkipShort skips t in -short mode, naming the suite (e2e, cri, …) that
// needs more than a unit test may take.
func SkipShort(t testing.TB, suite string) {
	t.Helper()
	if testing.Short() {
		t.Skip(suite + ": skipped in -short mode")
	}
}

// Installed fails t, naming the suite, at the first of tools that is not
// on the PATH: test/deps.sh installs them.
func Installed(t testing.TB, suite string, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s: %s is missing: run test/deps.sh", suite, tool)
		}
	}
}

// RepoRoot returns the root of the main module, found by walking up from
// the working directory (the package directory under `go test`).
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatalf("testhelp: getwd: %v", err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && modulePath(b) == mainModule {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("testhelp: no go.mod for %s above the working directory", mainModule)
		}
		dir = parent
	}
}

func modulePath(gomod []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(gomod))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`)
		}
	}
	return ""
}

// MountTmpfs mounts a tmpfs at dir (created 0700 if missing) with the
// mount data options ("size=4m", "mode=0700,size=64m": each caller's own,
// since a state directory's size and root mode are part of what a test
// sets up) and unmounts it when t ends. It needs root; callers skip
// without it, each saying why it needs the mount.
func MountTmpfs(t testing.TB, dir, options string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, options); err != nil {
		t.Fatalf("mounting tmpfs (%s) at %s: %v", options, dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

// ShortTempDir makes a directory under /tmp named after prefix, removed
// when t ends: its path is short enough for unix sockets (108 bytes),
// which t.TempDir() can exceed under some test runners.
func ShortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// TempNode skips t without root, with the message skip (each caller's
// own, saying what it needs root for), and otherwise makes a directory
// under /tmp (short enough for unix sockets) named after prefix, and a
// tmpfs mounted at its subdirectory "state" with the mount data options;
// both are removed when t ends.
func TempNode(t testing.TB, skip, prefix, options string) (dir, state string) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip(skip)
	}
	dir = ShortTempDir(t, prefix)
	state = filepath.Join(dir, "state")
	MountTmpfs(t, state, options)
	return dir, state
}

// MountsUnder lists the mount points of the caller's mount namespace at
// or under each of dirs (one under two of them is listed twice).
func MountsUnder(t testing.TB, dirs ...string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		for _, d := range dirs {
			if f[4] == d || strings.HasPrefix(f[4], d+"/") {
				out = append(out, f[4])
			}
		}
	}
	return out
}

// MetricSum adds up the samples of the labelled metric name in a
// Prometheus text exposition (every label set), failing t on a value it
// cannot read.
func MetricSum(t testing.TB, exposition []byte, name string) float64 {
	t.Helper()
	var sum float64
	for series, value := range samples(exposition) {
		if strings.HasPrefix(series, name+"{") {
			sum += parseSample(t, series, value)
		}
	}
	return sum
}

// Metric returns the value of one series of a Prometheus text exposition,
// named as it is exposed (name{label="value",...}), and whether it is
// there, failing t on a value it cannot read.
func Metric(t testing.TB, exposition []byte, series string) (float64, bool) {
	t.Helper()
	for s, value := range samples(exposition) {
		if s == series {
			return parseSample(t, s, value), true
		}
	}
	return 0, false
}

// samples yields every sample line's series and value, as written.
func samples(exposition []byte) iter.Seq2[string, string] {
	return func(yield func(series, value string) bool) {
		for _, line := range strings.Split(string(exposition), "\n") {
			i := strings.LastIndexByte(line, ' ')
			if line == "" || line[0] == '#' || i < 0 {
				continue
			}
			if !yield(line[:i], line[i+1:]) {
				return
			}
		}
	}
}

func parseSample(t testing.TB, series, value string) float64 {
	t.Helper()
	v, err := strconv.ParseFloat(value, 64)
	if err != nil {
		t.Fatalf("metrics: %s %q: %v", series, value, err)
	}
	return v
}

// LabelRecorder is a labeler (what internal/files calls a Labeler:
// Label(path) error) that remembers every path it is given, and refuses
// to label one whose base name is Fail.
type LabelRecorder struct {
	mu    sync.Mutex
	paths []string
	Fail  string
}

// Label records path.
func (l *LabelRecorder) Label(path string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.paths = append(l.paths, path)
	if l.Fail != "" && filepath.Base(path) == l.Fail {
		return errors.New("labelling refused")
	}
	return nil
}

// Take returns the paths recorded since the last Take.
func (l *LabelRecorder) Take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	p := l.paths
	l.paths = nil
	return p
}

// SyncBuffer is a log destination that several goroutines may write to
// while the test reads what they wrote.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns what was written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// StandIn starts `sleep` in a mount namespace of its own, standing in for
// a container's "runc init", and returns its pid once it sleeps there; it
// is killed when t ends. Ready means sleeping, not only unshared: unshare
// makes the namespace's mounts private after entering it, and a mount made
// into the namespace before that would propagate back to the caller's.
func StandIn(t testing.TB) int {
	t.Helper()
	proc := exec.Command("unshare", "--mount", "--propagation", "private", "sleep", "3600")
	// No Pdeathsig: the hook's mount enters namespaces on a locked
	// thread that then exits, which would kill what it started.
	if err := proc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.Process.Kill(); proc.Wait() })
	own, _ := os.Readlink("/proc/self/ns/mnt")
	dir := filepath.Join("/proc", strconv.Itoa(proc.Process.Pid))
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		ns, _ := os.Readlink(filepath.Join(dir, "ns/mnt"))
		comm, _ := os.ReadFile(filepath.Join(dir, "comm"))
		if ns != "" && ns != own && string(comm) == "sleep\n" {
			return proc.Process.Pid
		}
		if time.Now().After(deadline) {
			t.Fatal("unshare did not sleep in a new mount namespace within 5 s")
		}
	}
}
