// Package bench measures spiffe-oci-hook and spiffe-oci-refresher on the
// machine it runs on: container create latency under runc with and without
// the hook (real SPIRE), the hook against spiffe-helper one-shot, and the
// refresher's memory, idle CPU and rotation latency at 100 and 1,000
// containers (fake agent), with a spiffe-helper daemon as the per-pod
// sidecar anchor. It prints a Markdown table and writes BENCHMARKS.md.
//
// It reports numbers; it asserts nothing about them. Run it with
// `make bench` (root, runc, busybox-static and the pinned SPIRE binaries
// needed). Under plain `go test ./...` it skips itself.
//
// Knobs (environment): BENCH_ROUNDS (runc rounds per variant, default 60),
// BENCH_SCALES (refresher container counts, default "100,1000"),
// BENCH_IDLE (idle CPU window, default 30s), BENCH_ROTATIONS (default 3),
// BENCH_OUT (BENCHMARKS.md path; "-" for none), BENCH_REFRESHER_ENV (extra
// environment for the refresher only, e.g. GOMEMLIMIT=40MiB).
package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/spiretest"

	"github.com/noderesource/spiffe-oci-hook/test/benchmd"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const (
	trustDomain = "example.org"
	hookID      = "spiffe://example.org/spiffe-oci-hook"
	refresherID = "spiffe://example.org/spiffe-oci-refresher"
	workloadID  = "spiffe://example.org/workload/runc"
	helperID    = "spiffe://example.org/workload/spiffe-helper"
	fetchID     = "spiffe://example.org/bench/fetch"
	annotation  = "identity.noderesource.dev/container"
	annValue    = "- cert_dir: /certs\n"
	// jwtAnnValue adds one JWT-SVID and the JWT bundles to annValue.
	jwtAnnValue = annValue + "  jwt_svids: [{jwt_audience: bench, jwt_svid_file_name: jwt.token}]\n  jwt_bundle_file_name: jwt_bundle.json\n"
	warmup      = 3
	clkTck      = 100 // USER_HZ: /proc/PID/stat's utime and stime unit
)

// bins are the binaries under test, built for this run the way the
// Makefile builds release binaries (static, -trimpath).
type bins struct {
	hook, hookDirect, refresher, wrap, helper string
}

// benchAsRoot is how every benchmark here starts: it skips t unless
// benchmarks are switched on (benchmd.On) and it runs as root, which the
// benchmark needs for what need says.
func benchAsRoot(t *testing.T, need string) {
	benchmd.On(t)
	if os.Getuid() != 0 {
		t.Skip("benchmarks: need root (" + need + ")")
	}
}

func TestBench(t *testing.T) {
	benchAsRoot(t, "runc, mounts, SPIRE's unix attestor")
	for _, tool := range []string{"runc", "podman"} {
		if _, err := exec.LookPath(tool); err != nil && tool == "runc" {
			t.Fatalf("%s is missing: run test/deps.sh", tool)
		}
	}
	root := testhelp.RepoRoot(t)
	work := testhelp.ShortTempDir(t, "bench-")
	b := build(t, root, work)
	res := &results{
		Rounds:    envInt("BENCH_ROUNDS", 60),
		Idle:      envDuration("BENCH_IDLE", 30*time.Second),
		Rotations: envInt("BENCH_ROTATIONS", 3),
	}
	res.Machine = machine(root)
	res.Machine.HookInits, res.Machine.DirectInits = inits(b.hook), inits(b.hookDirect)
	progress("package initialisers: spiffe-oci-hook %d, spiffe-oci-hook-direct %d", res.Machine.HookInits, res.Machine.DirectInits)

	// BENCH_SKIP_SPIRE=1 measures the refresher alone (no table is
	// written then: BENCH_OUT must be "-").
	if os.Getenv("BENCH_SKIP_SPIRE") == "" && !t.Run("spire", func(t *testing.T) { benchSPIRE(t, b, res) }) {
		t.FailNow()
	}
	for _, n := range envInts("BENCH_SCALES", []int{100, 1000}) {
		if !t.Run(fmt.Sprintf("refresher-%d", n), func(t *testing.T) {
			res.Scale = append(res.Scale, benchRefresher(t, b, n, res))
		}) {
			t.FailNow()
		}
	}

	table := res.table()
	fmt.Print("\n" + table + "\n")
	out := os.Getenv("BENCH_OUT")
	if out == "" {
		out = filepath.Join(root, "BENCHMARKS.md")
	}
	if out != "-" {
		// The other parts' marked sections (<!-- begin NAME --> …
		// <!-- end NAME -->) are kept: this part rewrites only its own.
		old, _ := os.ReadFile(out)
		if err := os.WriteFile(out, []byte(res.document(table)+markedSections(string(old))), 0o644); err != nil {
			t.Fatal(err)
		}
		progress("wrote %s", out)
	}
}

// progress reports on stderr; the table goes to stdout.
func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

func build(t *testing.T, root, work string) bins {
	t.Helper()
	helper, _ := filepath.EvalSymlinks(spiretest.HelperBinary(t))
	b := bins{
		hook:       filepath.Join(work, "bin", "spiffe-oci-hook"),
		hookDirect: filepath.Join(work, "bin", "spiffe-oci-hook-direct"),
		refresher:  filepath.Join(work, "bin", "spiffe-oci-refresher"),
		wrap:       filepath.Join(work, "bin", "hookwrap"),
		helper:     helper,
	}
	// The binaries are built as `make build` builds them (make bench
	// passes its LDFLAGS), so the agent hashes what a node runs.
	ldflags := os.Getenv("BENCH_LDFLAGS")
	if ldflags == "" {
		ldflags = "-s -w -X main.version=bench"
	}
	tags := os.Getenv("BENCH_TAGS")
	if tags == "" {
		tags = "grpcnotrace"
	}
	for bin, pkg := range map[string]string{b.hook: "./hook", b.hookDirect: "./hook/direct", b.refresher: "./refresher", b.wrap: "./test/bench/hookwrap"} {
		cmd := exec.Command("go", "build", "-trimpath", "-tags", tags, "-ldflags", ldflags, "-o", bin, pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", pkg, err, out)
		}
	}
	// The agent's unix attestor hashes its caller's executable on every
	// call: the fetcher must cost the agent what the hook's direct path
	// (the binary that calls the agent) costs it.
	pad(t, b.wrap, b.hookDirect)
	return b
}

// pad appends zeros to bin until it is as large as like.
func pad(t *testing.T, bin, like string) {
	t.Helper()
	want, err := os.Stat(like)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	if got.Size() > want.Size() {
		t.Fatalf("%s (%d bytes) is larger than %s (%d bytes): cannot pad", bin, got.Size(), like, want.Size())
	}
	f, err := os.OpenFile(bin, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(make([]byte, want.Size()-got.Size())); err != nil {
		t.Fatal(err)
	}
}

// ---------------------------------------------------------------------
// ---------------------------------------------------------------------
// ---------------------------------------------------------------------
