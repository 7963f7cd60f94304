// Command testreport reads the `go test -json` events of a test run (the
// file gotestsum writes with --jsonfile) and prints what the run did: every
// skipped test with its reason, then one line with the counts,
//
//	summary: 812 passed, 0 failed, 14 skipped
//
// With -ci (make test sets it when CI=true), a skipped test is a failure
// unless test/skips.txt lists it with its reason: in CI, a suite that
// quietly did not run is not a green one. Its exit status is 1 when
// anything failed.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"sort"
	"strings"
)

func main() {
	events := flag.String("events", "", "`file` of go test -json events (gotestsum --jsonfile)")
	skipsFile := flag.String("skips", "test/skips.txt", "`file` listing the tests allowed to skip under -ci")
	ci := flag.Bool("ci", false, "fail on every skip that the skips file does not allow")
	module := flag.String("module", "", "module path to strip from package names (default: read from ./go.mod)")
	flag.Parse()
	if *events == "" {
		fmt.Fprintln(os.Stderr, "testreport: -events is required")
		os.Exit(2)
	}
	if *module == "" {
		*module = modulePath("go.mod")
	}
	f, err := os.Open(*events)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testreport: %v\n", err)
		os.Exit(2)
	}
	run, err := read(f, *module)
	f.Close()
	if err != nil {
		fmt.Fprintf(os.Stderr, "testreport: reading %s: %v\n", *events, err)
		os.Exit(2)
	}
	var allow []allowed
	if *ci {
		if allow, err = readSkips(*skipsFile); err != nil {
			fmt.Fprintf(os.Stderr, "testreport: %v\n", err)
			os.Exit(2)
		}
	}
	if !report(os.Stdout, run, allow, *ci, *skipsFile) {
		os.Exit(1)
	}
}

// event is one line of go test -json (cmd/test2json).
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

// test is one test or subtest of the run.
type test struct {
	pkg, name string
	// result is "pass", "fail" or "skip"; "" when the test never ended
	// (its package crashed or timed out).
	result string
	reason string // why it skipped
}

// run is what one go test run did.
type run struct {
	tests []*test
	// failedPkgs are packages that failed with no failed test to show
	// for it: a build failure, a crash, a timeout, TestMain.
	failedPkgs []string
}

// fileLine matches a t.Log/t.Skip line: "    file_test.go:55: message".
var fileLine = regexp.MustCompile(`^\s+\S+\.go:\d+: (.*)$`)

func read(r io.Reader, module string) (*run, error) {
	short := func(pkg string) string {
		if pkg == module {
			return "."
		}
		return strings.TrimPrefix(pkg, module+"/")
	}
	byKey := map[string]*test{}
	out := &run{}
	pkgFailed := map[string]bool{}
	var pkgOrder []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var e event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil || e.Action == "" {
			continue // not an event (a line from the go command itself)
		}
		pkg := short(e.Package)
		if e.Test == "" {
			if e.Action == "fail" && !pkgFailed[pkg] {
				pkgFailed[pkg] = true
				pkgOrder = append(pkgOrder, pkg)
			}
			continue
		}
		key := pkg + " " + e.Test
		t := byKey[key]
		if t == nil {
			t = &test{pkg: pkg, name: e.Test}
			byKey[key] = t
			out.tests = append(out.tests, t)
		}
		switch e.Action {
		case "output":
			if m := fileLine.FindStringSubmatch(strings.TrimRight(e.Output, "\n")); m != nil {
				t.reason = m[1]
			}
		case "pass", "fail", "skip":
			t.result = e.Action
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	failedIn := map[string]bool{}
	for _, t := range out.tests {
		if t.result == "fail" {
			failedIn[t.pkg] = true
		}
	}
	for _, pkg := range pkgOrder {
		if !failedIn[pkg] {
			out.failedPkgs = append(out.failedPkgs, pkg)
		}
	}
	return out, nil
}

// allowed is one line of the skips file.
type allowed struct {
	pkg, pattern, reason string
	line                 int
}

func (a allowed) match(t *test) bool {
	if a.pkg != t.pkg {
		return false
	}
	ok, _ := path.Match(a.pattern, t.name)
	return ok
}

// skipLine is a line of the skips file.
var skipLine = regexp.MustCompile(`^(\S+)\s+(\S+)\s+(\S.*)$`)

// readSkips reads the skips file: "<package dir> <test name pattern>
// <reason>" a line, # comments. The reason is required.
func readSkips(name string) ([]allowed, error) {
	data, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	var list []allowed
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		m := skipLine.FindStringSubmatch(line)
		if m == nil {
			return nil, fmt.Errorf("%s:%d: want <package dir> <test name pattern> <reason>", name, i+1)
		}
		if _, err := path.Match(m[2], ""); err != nil {
			return nil, fmt.Errorf("%s:%d: pattern %q: %w", name, i+1, m[2], err)
		}
		list = append(list, allowed{pkg: m[1], pattern: m[2], reason: m[3], line: i + 1})
	}
	if len(list) == 0 {
		return nil, errors.New(name + " lists no test")
	}
	return list, nil
}

// report prints the skipped tests, the failures and the counts; it
// returns false when the run failed.
func report(w io.Writer, r *run, allow []allowed, ci bool, skipsFile string) bool {
	var passed, failed, skipped int
	var skips, fails, refused []*test
	for _, t := range r.tests {
		switch t.result {
		case "pass":
			passed++
		case "fail":
			fails = append(fails, t)
		case "skip":
			skips = append(skips, t)
		}
	}
	sort.SliceStable(skips, func(i, j int) bool { return skips[i].pkg < skips[j].pkg })
	if len(skips) > 0 {
		fmt.Fprintf(w, "\nSkipped tests (%d):\n", len(skips))
	}
	for _, t := range skips {
		reason := t.reason
		if reason == "" {
			reason = "(no reason given)"
		}
		note := ""
		if ci {
			if a, ok := find(allow, t); ok {
				note = fmt.Sprintf("  [allowed by %s:%d]", skipsFile, a.line)
			} else {
				note = "  [NOT ALLOWED under CI=true]"
				refused = append(refused, t)
			}
		}
		fmt.Fprintf(w, "  %s %s: %s%s\n", t.pkg, t.name, reason, note)
	}
	if len(fails) > 0 || len(r.failedPkgs) > 0 {
		fmt.Fprintf(w, "\nFailed:\n")
		for _, t := range fails {
			fmt.Fprintf(w, "  %s %s\n", t.pkg, t.name)
		}
		for _, pkg := range r.failedPkgs {
			fmt.Fprintf(w, "  %s (the package failed: build, crash, timeout or TestMain; see its output above)\n", pkg)
		}
	}
	if len(refused) > 0 {
		fmt.Fprintf(w, "\nCI=true: %d skipped test(s) are not in %s. In CI a skip is a failure unless that file lists the test with the reason it may skip; make the test run, or list it there.\n", len(refused), skipsFile)
	}
	failed = len(fails) + len(r.failedPkgs) + len(refused)
	skipped = len(skips) - len(refused)
	fmt.Fprintf(w, "\nsummary: %d passed, %d failed, %d skipped\n", passed, failed, skipped)
	return failed == 0
}

func find(allow []allowed, t *test) (allowed, bool) {
	for _, a := range allow {
		if a.match(t) {
			return a, true
		}
	}
	return allowed{}, false
}

// modulePath reads the module line of a go.mod.
func modulePath(name string) string {
	data, err := os.ReadFile(name)
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
			return strings.Trim(strings.TrimSpace(rest), `"`)
		}
	}
	return ""
}
