package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const mod = "example.com/m"

// events is a run as go test -json reports it: a passing test, a test
// skipped with a reason, a subtest skipped inside a passing test, a failed
// test, and a package that did not build.
const events = `{"Action":"start","Package":"example.com/m/a"}
{"Action":"run","Package":"example.com/m/a","Test":"TestPass"}
{"Action":"output","Package":"example.com/m/a","Test":"TestPass","Output":"=== RUN   TestPass\n"}
{"Action":"pass","Package":"example.com/m/a","Test":"TestPass","Elapsed":0}
{"Action":"run","Package":"example.com/m/a","Test":"TestRoot"}
{"Action":"output","Package":"example.com/m/a","Test":"TestRoot","Output":"=== RUN   TestRoot\n"}
{"Action":"output","Package":"example.com/m/a","Test":"TestRoot","Output":"    a_test.go:12: needs root: mounts a tmpfs\n"}
{"Action":"output","Package":"example.com/m/a","Test":"TestRoot","Output":"--- SKIP: TestRoot (0.00s)\n"}
{"Action":"skip","Package":"example.com/m/a","Test":"TestRoot","Elapsed":0}
{"Action":"run","Package":"example.com/m/a","Test":"TestParent"}
{"Action":"run","Package":"example.com/m/a","Test":"TestParent/no_selinux"}
{"Action":"output","Package":"example.com/m/a","Test":"TestParent/no_selinux","Output":"    a_test.go:40: no SELinux kernel\n"}
{"Action":"skip","Package":"example.com/m/a","Test":"TestParent/no_selinux","Elapsed":0}
{"Action":"pass","Package":"example.com/m/a","Test":"TestParent","Elapsed":0}
{"Action":"pass","Package":"example.com/m/a","Elapsed":0.1}
{"Action":"run","Package":"example.com/m/b","Test":"TestBroken"}
{"Action":"output","Package":"example.com/m/b","Test":"TestBroken","Output":"    b_test.go:9: want 1, got 2\n"}
{"Action":"fail","Package":"example.com/m/b","Test":"TestBroken","Elapsed":0}
{"Action":"fail","Package":"example.com/m/b","Elapsed":0.1}
{"Action":"fail","Package":"example.com/m/c","Elapsed":0,"FailedBuild":"example.com/m/c [example.com/m/c.test]"}
not json: a line from the go command
`

func readEvents(t *testing.T, s string) *run {
	t.Helper()
	r, err := read(strings.NewReader(s), mod)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestReport(t *testing.T) {
	var out strings.Builder
	ok := report(&out, readEvents(t, events), nil, false, "skips.txt")
	got := out.String()
	if ok {
		t.Errorf("report of a run with failures returned ok:\n%s", got)
	}
	for _, want := range []string{
		"Skipped tests (2):",
		"  a TestRoot: needs root: mounts a tmpfs\n",
		"  a TestParent/no_selinux: no SELinux kernel\n",
		"  b TestBroken\n",
		"  c (the package failed",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("report lacks %q:\n%s", want, got)
		}
	}
	// The last line is the one CI's runner detection reads.
	if !strings.HasSuffix(got, "\nsummary: 2 passed, 2 failed, 2 skipped\n") {
		t.Errorf("closing line wrong:\n%s", got)
	}
}

func TestReportCI(t *testing.T) {
	skips := filepath.Join(t.TempDir(), "skips.txt")
	list := "# comment\n\na TestParent/* the kernel has no SELinux\n"
	if err := os.WriteFile(skips, []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	allow, err := readSkips(skips)
	if err != nil {
		t.Fatal(err)
	}
	if len(allow) != 1 || allow[0].reason != "the kernel has no SELinux" {
		t.Fatalf("readSkips = %+v", allow)
	}
	// Only skips: the listed one is allowed, the other fails the run.
	var onlySkips []string
	for _, line := range strings.Split(events, "\n") {
		if strings.Contains(line, `"example.com/m/a"`) {
			onlySkips = append(onlySkips, line)
		}
	}
	var out strings.Builder
	ok := report(&out, readEvents(t, strings.Join(onlySkips, "\n")), allow, true, skips)
	got := out.String()
	if ok {
		t.Errorf("an unlisted skip passed under CI:\n%s", got)
	}
	for _, want := range []string{
		"a TestRoot: needs root: mounts a tmpfs  [NOT ALLOWED under CI=true]",
		"a TestParent/no_selinux: no SELinux kernel  [allowed by " + skips + ":3]",
		"CI=true: 1 skipped test(s) are not in",
		"\nsummary: 2 passed, 1 failed, 1 skipped\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("report lacks %q:\n%s", want, got)
		}
	}
	// Without CI the same run passes, every skip listed with its reason.
	out.Reset()
	if !report(&out, readEvents(t, strings.Join(onlySkips, "\n")), nil, false, skips) {
		t.Errorf("a run with skips only failed without CI:\n%s", out.String())
	}
}

func TestReadSkipsRefusesMissingReason(t *testing.T) {
	skips := filepath.Join(t.TempDir(), "skips.txt")
	os.WriteFile(skips, []byte("a TestRoot\n"), 0o644)
	if _, err := readSkips(skips); err == nil || !strings.Contains(err.Error(), ":1: want") {
		t.Fatalf("readSkips without a reason: %v", err)
	}
}

// TestRepositorySkipsFile: the repository's own list reads, and every
// line names a package directory that exists.
func TestRepositorySkipsFile(t *testing.T) {
	allow, err := readSkips("../skips.txt")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range allow {
		if _, err := os.Stat(filepath.Join("../..", a.pkg)); err != nil {
			t.Errorf("skips.txt:%d: package %s: %v", a.line, a.pkg, err)
		}
	}
}
