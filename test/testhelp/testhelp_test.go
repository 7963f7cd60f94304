package testhelp

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fatalRecorder stands in for a test that Poll fails: it keeps the
// message and ends the goroutine as t.Fatal does.
type fatalRecorder struct {
	testing.TB
	msg string
}

func (f *fatalRecorder) Helper() {}

func (f *fatalRecorder) Fatal(args ...any) {
	f.msg = fmt.Sprint(args...)
	runtime.Goexit()
}

func (f *fatalRecorder) Fatalf(format string, args ...any) { f.Fatal(fmt.Sprintf(format, args...)) }

func TestPollWaitsAndFails(t *testing.T) {
	calls := 0
	Eventually(t, time.Second, "the third call", func() bool { calls++; return calls == 3 })
	if calls != 3 {
		t.Fatalf("cond called %d times, want 3", calls)
	}

	rec := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Poll{Every: time.Millisecond, Explain: func() string { return "saw nothing" }}.Eventually(rec, 20*time.Millisecond, "never", func() bool { return false })
	}()
	<-done
	if want := "after 20ms, still waiting for: never; saw nothing"; rec.msg != want {
		t.Fatalf("failure %q, want %q", rec.msg, want)
	}
}

func TestInstalled(t *testing.T) {
	Installed(t, "suite", "sh")
	rec := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Installed(rec, "suite", "sh", "no-such-tool-here")
	}()
	<-done
	if want := "suite: no-such-tool-here is missing: run test/deps.sh"; rec.msg != want {
		t.Fatalf("failure %q, want %q", rec.msg, want)
	}
}

func TestRepoRoot(t *testing.T) {
	root := RepoRoot(t)
	b, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil || modulePath(b) != mainModule {
		t.Fatalf("RepoRoot = %s: go.mod module %q, %v; want %s", root, modulePath(b), err, mainModule)
	}
}

func TestMetricSum(t *testing.T) {
	exposition := `# HELP x_total what
# TYPE x_total counter
x_total{kind="a"} 2
x_total{kind="b"} 3.5
x_total_other{kind="a"} 100
`
	if got := MetricSum(t, []byte(exposition), "x_total"); got != 5.5 {
		t.Fatalf("MetricSum = %v, want 5.5", got)
	}
	if got, ok := Metric(t, []byte(exposition), `x_total{kind="b"}`); !ok || got != 3.5 {
		t.Fatalf("Metric = %v, %v; want 3.5", got, ok)
	}
	if got, ok := Metric(t, []byte(exposition), `x_total{kind="c"}`); ok {
		t.Fatalf("Metric of a series not exposed = %v, true", got)
	}
}

func TestShortTempDir(t *testing.T) {
	var dir string
	t.Run("made", func(t *testing.T) {
		dir = ShortTempDir(t, "th-")
		if st, err := os.Stat(dir); err != nil || !st.IsDir() || filepath.Dir(dir) != "/tmp" || !strings.HasPrefix(filepath.Base(dir), "th-") {
			t.Fatalf("ShortTempDir = %s (%v): want a new directory /tmp/th-…", dir, err)
		}
	})
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("%s still there after the test that made it ended (%v)", dir, err)
	}
}

func TestMountTmpfs(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	dir := filepath.Join(t.TempDir(), "state")
	t.Run("mounted", func(t *testing.T) {
		MountTmpfs(t, dir, "mode=0700,size=1m")
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil || st.Type != unix.TMPFS_MAGIC {
			t.Fatalf("%s: statfs type %#x, %v; want a tmpfs", dir, st.Type, err)
		}
		if m := MountsUnder(t, filepath.Dir(dir)); !slices.Equal(m, []string{dir}) {
			t.Fatalf("MountsUnder(%s) = %q, want the tmpfs alone", filepath.Dir(dir), m)
		}
	})
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mounts), " "+dir+" ") {
		t.Fatalf("%s still mounted after the test that mounted it ended", dir)
	}
}
