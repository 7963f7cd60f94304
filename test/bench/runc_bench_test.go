package bench

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-tools/generate"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// Part 1 and 2: runc create latency, hook overhead, hook vs spiffe-helper.

func benchSPIRE(t *testing.T, b bins, res *results) {
	progress("starting SPIRE server and agent")
	s := spiretest.Start(t, spiretest.Options{TrustDomain: trustDomain, AuthorizedDelegates: []string{hookID, fetchID, refresherID}})
	dir := testhelp.ShortTempDir(t, "bsp-")
	// Two state directories: one a refresher serves (the hook hands the
	// container over), one no refresher serves (the hook runs
	// spiffe-oci-hook-direct).
	stateDir := filepath.Join(dir, "state")
	testhelp.MountTmpfs(t, stateDir, "mode=0700,size=64m")
	servedDir := filepath.Join(dir, "served")
	testhelp.MountTmpfs(t, servedDir, "mode=0700,size=64m")
	helperDir := filepath.Join(dir, "helper")
	testhelp.MountTmpfs(t, helperDir, "mode=0700,size=16m")
	config := filepath.Join(dir, "config.yaml")
	writeFile(t, config, fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\ntimeout: 10s\n", s.AdminSocket, stateDir))
	servedConfig := filepath.Join(dir, "served.yaml")
	writeFile(t, servedConfig, fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\ntimeout: 10s\n", s.AdminSocket, servedDir))
	rg := &rig{
		runcRoot:       filepath.Join(dir, "runc"),
		store:          statedir.Store{Dir: stateDir},
		served:         statedir.Store{Dir: servedDir},
		hookLog:        filepath.Join(dir, "hook-times.log"),
		fetchLog:       filepath.Join(dir, "fetch-times.log"),
		handoffLog:     filepath.Join(dir, "handoff-times.log"),
		handoffFetches: filepath.Join(dir, "handoff-fetch-times.log"),
		helper:         b.helper,
		hook:           b.hook,
		hookDirect:     b.hookDirect,
		refresher:      b.refresher,
		servedConfig:   servedConfig,
		oneshot:        filepath.Join(helperDir, "oneshot"),
	}

	initPath := runcInitPath(t, dir, rg.runcRoot)
	res.Machine.RuncInitPath = initPath
	s.CreateEntry(t, hookID, []string{"unix:uid:0", "unix:path:" + b.hookDirect}, time.Hour)
	s.CreateEntry(t, refresherID, []string{"unix:uid:0", "unix:path:" + b.refresher}, time.Hour)
	s.CreateEntry(t, fetchID, []string{"unix:uid:0", "unix:path:" + b.wrap}, time.Hour)
	s.CreateEntry(t, workloadID, []string{"unix:uid:0", "unix:path:" + initPath}, time.Hour)
	s.CreateEntry(t, helperID, []string{"unix:uid:0", "unix:path:" + b.helper}, time.Hour)
	s.WaitSynced(t, 0)

	hook := rspec.Hook{Path: b.hook, Args: []string{"spiffe-oci-hook", "--config", config}}
	served := rspec.Hook{Path: b.hook, Args: []string{"spiffe-oci-hook", "--config", servedConfig}}
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
		{name: "hook + annotation, handed to the refresher", bundle: newBundle(t, dir, "handoff", []rspec.Hook{served}, true)},
		{name: "hook + annotation, handed to the refresher, timed", bundle: newBundle(t, dir, "handofftimed", []rspec.Hook{
			{Path: b.wrap, Args: append([]string{"hookwrap", "time", rg.handoffLog, b.hook}, served.Args...)},
			{Path: b.wrap, Args: []string{"hookwrap", "fetch", rg.handoffFetches, s.AdminSocket, "3"}},
		}, true)},
		{name: "spiffe-oci-hook-direct --version"},
	}
	rg.helperConf = filepath.Join(dir, "helper.conf")
	writeFile(t, rg.helperConf, helperConfig(s.WorkloadSocket, rg.oneshot, false))
	os.MkdirAll(rg.oneshot, 0o755)

	stop := rg.startRefresher(t)
	res.Create = append(res.Create, rg.pass(t, "agent as test/e2e runs it (unix attestor: discover_workload_path, default workload_size_limit: hashes executables)", res.Rounds))
	stop()

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
	poll.Eventually(t, 30*time.Second, "spiffe-helper daemon wrote its SVID", func() bool {
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
	if !noHashing(t, s, "the no-hashing pass") {
		return
	}
	stop = rg.startRefresher(t)
	res.Create = append(res.Create, rg.pass(t, "same agent, workload_size_limit = -1 (no executable hashing)", res.Rounds))
	stop()
}

// startRefresher runs spiffe-oci-refresher on the served state directory
// until the returned func stops it: started for each pass, so that it
// meets the agent as the pass's configuration has it.
func (rg *rig) startRefresher(t *testing.T) (stop func()) {
	return startServing(t, rg.refresher, rg.servedConfig, rg.served)
}

// startServing runs the refresher at bin with config, which serves store,
// until it listens on the handoff socket, and returns what stops it.
//
// When stopped it checks that it took containers over and refused none.
func startServing(t *testing.T, bin, config string, store statedir.Store) (stop func()) {
	t.Helper()
	metrics := strings.TrimSuffix(config, ".yaml") + "-metrics.sock" // rig.servedMetrics
	cmd := exec.Command(bin, "--config", config, "--metrics-socket", metrics)
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	poll.Eventually(t, 30*time.Second, "the refresher listening on its handoff socket", func() bool {
		select {
		case <-exited:
			t.Fatalf("the refresher exited:\n%s", log.String())
		default:
		}
		_, err := os.Stat(store.HandoffSocket())
		return err == nil
	})
	return func() {
		h := readHandoffs(t, metrics)
		progress("  the refresher took %v containers over from the hook, refused %v", h.delivered, h.refused)
		if h.delivered == 0 || h.refused != 0 {
			t.Errorf("the refresher took %v containers over and refused %v; want some and none:\n%s", h.delivered, h.refused, log.String())
		}
		cmd.Process.Signal(syscall.SIGTERM)
		<-exited
	}
}

// servedMetrics is the metrics socket of the refresher that serves the
// handed-over variants (startServing's).
func (rg *rig) servedMetrics() string {
	return strings.TrimSuffix(rg.servedConfig, ".yaml") + "-metrics.sock"
}

// handoffStats is what the refresher's metrics say of the containers the
// hook handed over: spiffe_oci_handoffs_total by result, and
// spiffe_oci_handoff_duration_seconds{result="delivered"}'s sum (seconds)
// and count.
type handoffStats struct{ delivered, refused, sum, count float64 }

// readHandoffs reads handoffStats from the refresher's metrics socket.
func readHandoffs(t *testing.T, socket string) handoffStats {
	t.Helper()
	code, body, err := status.NewClient(socket).Get(context.Background(), status.PathMetrics)
	if err != nil || code != 200 {
		t.Fatalf("GET %s on %s: HTTP %d, %v", status.PathMetrics, socket, code, err)
	}
	var h handoffStats
	for series, v := range map[string]*float64{
		`spiffe_oci_handoffs_total{result="delivered"}`:                 &h.delivered,
		`spiffe_oci_handoffs_total{result="refused"}`:                   &h.refused,
		`spiffe_oci_handoff_duration_seconds_sum{result="delivered"}`:   &h.sum,
		`spiffe_oci_handoff_duration_seconds_count{result="delivered"}`: &h.count,
	} {
		*v, _ = testhelp.Metric(t, body, series)
	}
	return h
}

// rig is what the runc passes share.
type rig struct {
	variants           []*variant
	runcRoot           string
	store              statedir.Store
	hookLog, fetchLog  string
	helper, helperConf string
	hook               string
	// The handed-over variants: the state directory the refresher serves,
	// its configuration, the hook's and the fetcher's logs.
	served                     statedir.Store
	servedConfig               string
	handoffLog, handoffFetches string
	hookDirect, refresher      string
	oneshot                    string
	seq                        int
}

// pass runs every variant once per round, in a new random order each round.
func (rg *rig) pass(t *testing.T, name string, rounds int) createResult {
	t.Helper()
	progress("runc create latency, %s: %d interleaved rounds (+%d warm-up) of %d variants", name, rounds, warmup, len(rg.variants))
	samples := make([][]time.Duration, len(rg.variants))
	var hookWall, fetch, overhead, noAnnWall []time.Duration
	var handoffWall, handoffFetch, handoffOverhead []time.Duration
	var handoffRefresher, handoffOwn []time.Duration
	var refresherBefore handoffStats
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
			case directFloorVariant:
				d = runHelper(t, rg.hookDirect, "--version")
			default:
				if i == handoffTimedVariant {
					refresherBefore = readHandoffs(t, rg.servedMetrics())
				}
				var err error
				var stderr string
				d, stderr, err = runc(v.bundle, rg.runcRoot, id)
				if err != nil {
					t.Fatalf("runc run (%s): %v\n%s", v.name, err, stderr)
				}
			}
			if i == 2 || i == 3 || i == jwtVariant || i == handoffVariant || i == handoffTimedVariant {
				store := rg.store
				if i == handoffVariant || i == handoffTimedVariant {
					store = rg.served
				}
				// A handed-over container's state is the refresher's once
				// recorded, and it removes it as soon as /bin/true exits:
				// its delivery shows in the refresher's count (startServing).
				if !checked[i] && store != rg.served {
					checked[i] = true
					checkFiles(t, store.DeliveryDir(id, 0), workloadID)
					if tok, err := os.ReadFile(filepath.Join(store.DeliveryDir(id, 0), "jwt.token")); i == jwtVariant && len(tok) == 0 {
						t.Fatalf("the JWT variant delivered no token: %v", err)
					}
				}
				if err := store.Remove(id); err != nil {
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
			if i == handoffTimedVariant {
				w := hookTime(t, rg.handoffLog, id)
				f := fetchTimes(t, rg.handoffFetches, id)
				handoffWall = append(handoffWall, w)
				handoffFetch = append(handoffFetch, f...)
				handoffOverhead = append(handoffOverhead, w-median(f))
				// What the refresher took for this very container, by its
				// own clock: the rest of the hook's wall time is the hook's.
				after := readHandoffs(t, rg.servedMetrics())
				if n := after.count - refresherBefore.count; n != 1 {
					t.Fatalf("the refresher observed %v handoffs for one handed-over container", n)
				}
				r := time.Duration((after.sum - refresherBefore.sum) * float64(time.Second))
				handoffRefresher = append(handoffRefresher, r)
				handoffOwn = append(handoffOwn, w-r)
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
	r.HandoffWall = stat{Name: "hook wall, handed over", Samples: handoffWall}
	r.HandoffFetch = stat{Name: "agent fetch, handed over", Samples: handoffFetch}
	r.HandoffOverhead = stat{Name: "hook overhead, handed over", Samples: handoffOverhead}
	r.HandoffRefresher = stat{Name: "the refresher's delivery, handed over", Samples: handoffRefresher}
	r.HandoffOwn = stat{Name: "hook's own time, handed over", Samples: handoffOwn}
	r.PairedHandoff = paired(samples[handoffVariant], samples[0])
	progress("  no hook %s, no annotation %s, annotated %s (handed over %s); hook wall %s (handed over %s), agent round-trip %s, spiffe-helper %s",
		ms(r.Variants[0].Median()), ms(r.Variants[1].Median()), ms(r.Variants[2].Median()), ms(r.Variants[handoffVariant].Median()),
		ms(r.HookWall.Median()), ms(r.HandoffWall.Median()), ms(r.Fetch.Median()), ms(r.Variants[4].Median()))
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

// logFields reads one of hookwrap's logs: the fields of each line.
func logFields(t *testing.T, log string) [][]string {
	t.Helper()
	data, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	var lines [][]string
	for _, line := range strings.Split(string(data), "\n") {
		lines = append(lines, strings.Fields(line))
	}
	return lines
}

// fetchTimes reads the agent round-trips hookwrap fetch measured for id.
func fetchTimes(t *testing.T, log, id string) []time.Duration {
	t.Helper()
	for _, f := range logFields(t, log) {
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
	for _, f := range logFields(t, log) {
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
// The variants the pass treats apart, by their index in rig.variants.
const (
	jwtVariant          = 8
	handoffVariant      = 9
	handoffTimedVariant = 10
	directFloorVariant  = 11
)

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
