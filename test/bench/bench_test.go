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
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
	rspec "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-tools/generate"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/record"
	"github.com/noderesource/spiffe-oci-hook/internal/spiretest"
)

const (
	trustDomain = "example.org"
	hookID      = "spiffe://example.org/spiffe-oci-hook"
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
	hook, refresher, wrap, helper string
}

func TestBench(t *testing.T) {
	if os.Getenv("SPIFFE_OCI_BENCH") == "" {
		t.Skip("benchmarks: run `make bench` (sets SPIFFE_OCI_BENCH=1)")
	}
	if os.Getuid() != 0 {
		t.Skip("benchmarks: need root (runc, mounts, SPIRE's unix attestor)")
	}
	for _, tool := range []string{"runc", "podman"} {
		if _, err := exec.LookPath(tool); err != nil && tool == "runc" {
			t.Fatalf("%s is missing: run test/deps.sh", tool)
		}
	}
	root := spiretest.RepoRoot(t)
	work := tempDir(t, "bench-")
	b := build(t, root, work)
	res := &results{
		Rounds:    envInt("BENCH_ROUNDS", 60),
		Idle:      envDuration("BENCH_IDLE", 30*time.Second),
		Rotations: envInt("BENCH_ROTATIONS", 3),
	}
	res.Machine = machine(root)

	if !t.Run("spire", func(t *testing.T) { benchSPIRE(t, b, res) }) {
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
		if err := os.WriteFile(out, []byte(res.document(table)), 0o644); err != nil {
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
		hook:      filepath.Join(work, "bin", "spiffe-oci-hook"),
		refresher: filepath.Join(work, "bin", "spiffe-oci-refresher"),
		wrap:      filepath.Join(work, "bin", "hookwrap"),
		helper:    helper,
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
	for bin, pkg := range map[string]string{b.hook: "./hook", b.refresher: "./refresher", b.wrap: "./test/bench/hookwrap"} {
		cmd := exec.Command("go", "build", "-trimpath", "-tags", tags, "-ldflags", ldflags, "-o", bin, pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", pkg, err, out)
		}
	}
	// The agent's unix attestor hashes its caller's executable on every
	// call: the fetcher must cost the agent what the hook costs it.
	pad(t, b.wrap, b.hook)
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
// Part 1 and 2: runc create latency, hook overhead, hook vs spiffe-helper.

func benchSPIRE(t *testing.T, b bins, res *results) {
	progress("starting SPIRE server and agent")
	s := spiretest.Start(t, spiretest.Options{TrustDomain: trustDomain, AuthorizedDelegates: []string{hookID, fetchID}})
	dir := tempDir(t, "bsp-")
	stateDir := filepath.Join(dir, "state")
	mountTmpfs(t, stateDir, "64m")
	helperDir := filepath.Join(dir, "helper")
	mountTmpfs(t, helperDir, "16m")
	config := filepath.Join(dir, "config.yaml")
	writeFile(t, config, fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\ntimeout: 10s\n", s.AdminSocket, stateDir))
	rg := &rig{
		runcRoot: filepath.Join(dir, "runc"),
		store:    record.Store{Dir: stateDir},
		hookLog:  filepath.Join(dir, "hook-times.log"),
		fetchLog: filepath.Join(dir, "fetch-times.log"),
		helper:   b.helper,
		hook:     b.hook,
		oneshot:  filepath.Join(helperDir, "oneshot"),
	}

	initPath := runcInitPath(t, dir, rg.runcRoot)
	res.Machine.RuncInitPath = initPath
	s.CreateEntry(t, hookID, []string{"unix:uid:0", "unix:path:" + b.hook}, time.Hour)
	s.CreateEntry(t, fetchID, []string{"unix:uid:0", "unix:path:" + b.wrap}, time.Hour)
	s.CreateEntry(t, workloadID, []string{"unix:uid:0", "unix:path:" + initPath}, time.Hour)
	s.CreateEntry(t, helperID, []string{"unix:uid:0", "unix:path:" + b.helper}, time.Hour)
	waitSynced(t, s)

	hook := rspec.Hook{Path: b.hook, Args: []string{"spiffe-oci-hook", "--config", config}}
	rg.variants = []*variant{
		{name: "no hook", bundle: newBundle(t, dir, "nohook", nil, false)},
		{name: "hook, no annotation", bundle: newBundle(t, dir, "noann", []rspec.Hook{hook}, false)},
		{name: "hook + annotation", bundle: newBundle(t, dir, "ann", []rspec.Hook{hook}, true)},
		{name: "hook + annotation, timed", bundle: newBundle(t, dir, "timed", []rspec.Hook{
			{Path: b.wrap, Args: append([]string{"hookwrap", "time", rg.hookLog, b.hook}, hook.Args...)},
			{Path: b.wrap, Args: []string{"hookwrap", "fetch", rg.fetchLog, s.AdminSocket, "3"}},
		}, true)},
		{name: "spiffe-helper one-shot"},
		{name: "hook, no annotation, timed", bundle: newBundle(t, dir, "noanntimed", []rspec.Hook{
			{Path: b.wrap, Args: append([]string{"hookwrap", "time", rg.hookLog, b.hook}, hook.Args...)},
		}, false)},
		{name: "spiffe-oci-hook --version"},
		{name: "spiffe-helper -version"},
		{name: "hook + annotation with a JWT-SVID and JWT bundles", bundle: newBundleWith(t, dir, "jwt", []rspec.Hook{hook}, jwtAnnValue)},
	}
	rg.helperConf = filepath.Join(dir, "helper.conf")
	writeFile(t, rg.helperConf, helperConfig(s.WorkloadSocket, rg.oneshot, false))
	os.MkdirAll(rg.oneshot, 0o755)

	res.Create = append(res.Create, rg.pass(t, "agent as test/e2e runs it (unix attestor: discover_workload_path, default workload_size_limit: hashes executables)", res.Rounds))

	// The per-pod sidecar anchor: one spiffe-helper daemon.
	progress("spiffe-helper daemon: memory and %s idle CPU", res.Idle)
	daemonDir := filepath.Join(helperDir, "daemon")
	os.MkdirAll(daemonDir, 0o755)
	daemonConf := filepath.Join(dir, "helper-daemon.conf")
	writeFile(t, daemonConf, helperConfig(s.WorkloadSocket, daemonDir, true))
	cmd := exec.Command(b.helper, "-config", daemonConf)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "spiffe-helper daemon wrote its SVID", func() bool {
		_, err := os.Stat(filepath.Join(daemonDir, "svid.pem"))
		return err == nil
	})
	checkFiles(t, daemonDir, helperID)
	time.Sleep(3 * time.Second)
	res.Helper.Mem = readMem(t, cmd.Process.Pid)
	res.Helper.IdleCPU = idleCPU(t, cmd.Process.Pid, res.Idle)
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()

	// The same comparison with the agent's executable hashing off, which
	// is most of the agent's time per call (see BENCHMARKS.md).
	conf := filepath.Join(s.Dir, "agent.conf")
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	const key = "discover_workload_path = true"
	if strings.Count(string(data), key) != 1 {
		progress("agent.conf has no single %q; skipping the no-hashing pass", key)
		return
	}
	progress("restarting the agent with workload_size_limit = -1 (no executable hashing)")
	s.StopAgent(t)
	writeFile(t, conf, strings.Replace(string(data), key, key+"\n            workload_size_limit = -1", 1))
	s.StartAgent(t)
	waitSynced(t, s)
	res.Create = append(res.Create, rg.pass(t, "same agent, workload_size_limit = -1 (no executable hashing)", res.Rounds))
}

// rig is what the runc passes share.
type rig struct {
	variants           []*variant
	runcRoot           string
	store              record.Store
	hookLog, fetchLog  string
	helper, helperConf string
	hook               string
	oneshot            string
	seq                int
}

// pass runs every variant once per round, in a new random order each round.
func (rg *rig) pass(t *testing.T, name string, rounds int) createResult {
	t.Helper()
	progress("runc create latency, %s: %d interleaved rounds (+%d warm-up) of %d variants", name, rounds, warmup, len(rg.variants))
	samples := make([][]time.Duration, len(rg.variants))
	var hookWall, fetch, overhead, noAnnWall []time.Duration
	checked := map[int]bool{}
	rnd := rand.New(rand.NewPCG(1, uint64(len(name))))
	for round := -warmup; round < rounds; round++ {
		// A fresh random order every round: no variant always follows
		// the same one (a runc run's teardown can spill into the next).
		for _, i := range rnd.Perm(len(rg.variants)) {
			v := rg.variants[i]
			rg.seq++
			id := fmt.Sprintf("bench-%d-%d", i, rg.seq)
			var d time.Duration
			switch i {
			case 4:
				d = runHelper(t, rg.helper, "-config", rg.helperConf)
				if !checked[i] {
					checked[i] = true
					checkFiles(t, rg.oneshot, helperID)
				}
			case 6:
				d = runHelper(t, rg.hook, "--version")
			case 7:
				d = runHelper(t, rg.helper, "-version")
			default:
				var err error
				var stderr string
				d, stderr, err = runc(v.bundle, rg.runcRoot, id)
				if err != nil {
					t.Fatalf("runc run (%s): %v\n%s", v.name, err, stderr)
				}
			}
			if i == 2 || i == 3 || i == jwtVariant {
				if !checked[i] {
					checked[i] = true
					checkFiles(t, rg.store.DeliveryDir(id, 0), workloadID)
					if tok, err := os.ReadFile(filepath.Join(rg.store.DeliveryDir(id, 0), "jwt.token")); i == jwtVariant && len(tok) == 0 {
						t.Fatalf("the JWT variant delivered no token: %v", err)
					}
				}
				if err := rg.store.Remove(id); err != nil {
					t.Fatal(err)
				}
			}
			if round < 0 {
				continue
			}
			if i == 5 {
				noAnnWall = append(noAnnWall, hookTime(t, rg.hookLog, id))
			}
			if i == 3 {
				w := hookTime(t, rg.hookLog, id)
				f := fetchTimes(t, rg.fetchLog, id)
				hookWall = append(hookWall, w)
				fetch = append(fetch, f...)
				overhead = append(overhead, w-median(f))
			}
			samples[i] = append(samples[i], d)
		}
	}
	r := createResult{Name: name}
	for i, v := range rg.variants {
		r.Variants = append(r.Variants, stat{Name: v.name, Samples: samples[i]})
	}
	r.HookWall = stat{Name: "hook wall", Samples: hookWall}
	r.Fetch = stat{Name: "agent fetch", Samples: fetch}
	r.Overhead = stat{Name: "hook overhead", Samples: overhead}
	r.NoAnnWall = stat{Name: "hook wall, no annotation", Samples: noAnnWall}
	r.PairedNoAnn = paired(samples[1], samples[0])
	r.PairedAnn = paired(samples[2], samples[0])
	r.PairedJWT = paired(samples[jwtVariant], samples[0])
	progress("  no hook %s, no annotation %s, annotated %s; hook wall %s, agent round-trip %s, spiffe-helper %s",
		ms(r.Variants[0].Median()), ms(r.Variants[1].Median()), ms(r.Variants[2].Median()), ms(r.HookWall.Median()), ms(r.Fetch.Median()), ms(r.Variants[4].Median()))
	return r
}

type variant struct {
	name    string
	bundle  string
	samples []time.Duration
}

// runc runs a bundle to completion with `runc run` and returns its wall time.
func runc(bundle, root, id string) (time.Duration, string, error) {
	cmd := exec.Command("runc", "--root", root, "run", "--bundle", bundle, id)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		exec.Command("runc", "--root", root, "delete", "--force", id).Run()
	}
	return d, stderr.String(), err
}

// fetchTimes reads the agent round-trips hookwrap fetch measured for id.
func fetchTimes(t *testing.T, log, id string) []time.Duration {
	t.Helper()
	data, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != id {
			continue
		}
		if f[1] != workloadID {
			t.Fatalf("the agent gave container %s the SVID %s, want %s", id, f[1], workloadID)
		}
		var out []time.Duration
		for _, v := range f[2:] {
			n, _ := strconv.ParseInt(v, 10, 64)
			out = append(out, time.Duration(n))
		}
		return out
	}
	t.Fatalf("no agent round-trip recorded for %s", id)
	return nil
}

func hookTime(t *testing.T, log, id string) time.Duration {
	t.Helper()
	data, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) == 4 && f[0] == id {
			if f[3] != "0" {
				t.Fatalf("hook exited %s for %s", f[3], id)
			}
			s, _ := strconv.ParseInt(f[1], 10, 64)
			e, _ := strconv.ParseInt(f[2], 10, 64)
			return time.Duration(e - s)
		}
	}
	t.Fatalf("no hook time recorded for %s", id)
	return 0
}

func helperConfig(socket, certDir string, daemon bool) string {
	return fmt.Sprintf(`agent_address = %q
cert_dir = %q
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
daemon_mode = %v
`, socket, certDir, daemon)
}

// runHelper times a process from start to exit.
func runHelper(t *testing.T, bin string, args ...string) time.Duration {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", bin, args, err, out.String())
	}
	return d
}

// checkFiles checks that dir holds a valid SVID for want.
func checkFiles(t *testing.T, dir, want string) {
	t.Helper()
	svid, err := x509svid.Load(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid_key.pem"))
	if err != nil {
		t.Fatalf("%s: %v", dir, err)
	}
	if svid.ID.String() != want {
		t.Fatalf("%s holds an SVID for %s, want %s", dir, svid.ID, want)
	}
}

// jwtVariant is the index of the variant whose annotation asks for a
// JWT-SVID too.
const jwtVariant = 8

// newBundleWith is newBundle annotated with value.
func newBundleWith(t *testing.T, dir, name string, hooks []rspec.Hook, value string) string {
	t.Helper()
	bdir := newBundle(t, dir, name, hooks, false)
	g, err := generate.NewFromFile(filepath.Join(bdir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	g.AddAnnotation(annotation, value)
	if err := g.SaveToFile(filepath.Join(bdir, "config.json"), generate.ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	return bdir
}

// newBundle writes an OCI bundle running busybox /bin/true.
func newBundle(t *testing.T, dir, name string, hooks []rspec.Hook, annotated bool) string {
	t.Helper()
	bdir := filepath.Join(dir, name)
	rootfs := filepath.Join(bdir, "rootfs")
	makeRootfs(t, rootfs)
	g, err := generate.New("linux")
	if err != nil {
		t.Fatal(err)
	}
	g.SetRootPath("rootfs")
	g.SetProcessTerminal(false)
	g.SetProcessArgs([]string{"/bin/true"})
	g.SetHostname("bench")
	if annotated {
		g.AddAnnotation(annotation, annValue)
	}
	if len(hooks) > 0 {
		g.Config.Hooks = &rspec.Hooks{CreateRuntime: hooks}
	}
	if err := g.SaveToFile(filepath.Join(bdir, "config.json"), generate.ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	return bdir
}

func makeRootfs(t *testing.T, rootfs string) {
	t.Helper()
	for _, d := range []string{"bin", "proc", "dev", "sys", "tmp", "etc"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("busybox-static is missing: %v", err)
	}
	writeFileMode(t, filepath.Join(rootfs, "bin", "busybox"), data, 0o755)
	for _, a := range []string{"sh", "true", "sleep", "cat"} {
		os.Symlink("busybox", filepath.Join(rootfs, "bin", a))
	}
}

// runcInitPath asks the real runc what SPIRE's unix attestor sees as the
// path of the container's pid at createRuntime (test/e2e does the same).
func runcInitPath(t *testing.T, dir, root string) string {
	t.Helper()
	probe := filepath.Join(dir, "probe.sh")
	out := filepath.Join(dir, "probe.out")
	writeFileMode(t, probe, []byte("#!/bin/sh\npid=$(sed 's/.*\"pid\":\\([0-9]*\\).*/\\1/')\nreadlink /proc/$pid/exe > "+out+"\n"), 0o755)
	bundle := newBundle(t, dir, "probe", []rspec.Hook{{Path: probe}}, false)
	if _, stderr, err := runc(bundle, root, fmt.Sprintf("probe-%d", time.Now().UnixNano())); err != nil {
		t.Fatalf("probe: %v: %s", err, stderr)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(data))
}

// waitSynced blocks until every entry created so far has reached the agent
// (an entry created last being there means the earlier ones are too).
func waitSynced(t *testing.T, s *spiretest.SPIRE) {
	t.Helper()
	sleep := exec.Command("sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleep.Process.Kill(); sleep.Wait() }()
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", sleep.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("spiffe://%s/sentinel/%d", trustDomain, time.Now().UnixNano())
	entry := s.CreateEntry(t, id, []string{"unix:uid:0", "unix:path:" + exe}, time.Hour)
	s.WaitForSVID(t, sleep.Process.Pid, id, 60*time.Second)
	s.DeleteEntry(t, entry)
}

// ---------------------------------------------------------------------
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
	dir := tempDir(t, "brf-")
	state := filepath.Join(dir, "state")
	mountTmpfs(t, state, "256m")
	socket := filepath.Join(dir, "admin.sock")
	fake, err := fakeagent.New(trustDomain, socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fake.Stop)
	workload := spiffeid.RequireFromString(workloadID)
	fake.Default = []spiffeid.ID{workload}
	store := record.Store{Dir: state}
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
	update, bundles, err := client.FetchX509(ctx, pids[0])
	client.Close()
	if err != nil {
		t.Fatal(err)
	}
	d := record.Delivery{Delivery: ds[0], Delivered: update.SVIDs[0].ID.String()}
	fs, err := files.Identity(d.Names(), update.SVIDs[0], bundles, nil)
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
		rec := record.Record{ID: ids[i], PID: pid, StartTime: st, AgentSocket: socket, Deliveries: []record.Delivery{d}, Created: time.Now().UTC()}
		if err := store.Save(rec); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "the setup fetch's streams closed", func() bool { return fake.SVIDStreams() == 0 })

	// Every ..data swap is an IN_MOVED_TO ("create") of dir/..data.
	w := newSwapWatcher(t, dirs)

	config := filepath.Join(dir, "config.yaml")
	writeFile(t, config, fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\n", socket, state))
	start := time.Now()
	r := startRefresher(t, b.refresher, config, dir)
	waitFor(t, 120*time.Second, "every container served and rewritten once", func() bool {
		return fake.SVIDStreams() == int64(n) && w.allSince(start)
	})
	out.Startup = time.Since(start)
	progress("refresher at %d containers: all served after %s; settling, then %s idle", n, out.Startup.Round(time.Millisecond), res.Idle)
	time.Sleep(3 * time.Second)
	out.Mem = readMem(t, r.Process.Pid)
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
		waitFor(t, 60*time.Second, "every container rewritten after Rotate", func() bool { return w.allSince(t0) })
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
	cmd := exec.Command(bin, "--config", config)
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
	for _, line := range strings.Split(string(status), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			m.RSS = v
		case "VmHWM:":
			m.HWM = v
		case "Threads:":
			m.Threads = int(v)
		}
	}
	if rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid)); err == nil {
		for _, line := range strings.Split(string(rollup), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			v, _ := strconv.ParseInt(f[1], 10, 64)
			switch f[0] {
			case "Pss:":
				m.PSS = v
			case "Private_Clean:", "Private_Dirty:":
				m.Private += v
			}
		}
	}
	return m
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

// ---------------------------------------------------------------------
// Helpers.

func tempDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func mountTmpfs(t *testing.T, dir, size string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "mode=0700,size="+size); err != nil {
		t.Fatalf("mounting tmpfs at %s: %v", dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	writeFileMode(t, path, []byte(content), 0o600)
}

func writeFileMode(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: not yet: %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func envInts(name string, def []int) []int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	var out []int
	for _, f := range strings.Split(v, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	return out
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

var _ = runtime.Version
