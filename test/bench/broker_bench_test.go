package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/spiretest"

	"github.com/noderesource/spiffe-oci-hook/test/benchmd"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// apiResult is one agent API on one agent configuration.
type apiResult struct {
	agent, api   string
	create       []time.Duration // runc run with the annotated, timed hook
	hook         []time.Duration // the hook process's wall time
	attestations float64         // agent attestations per delivery
}

// TestBenchBrokerAPI (make bench, BENCH_PARTS=broker) compares the hook
// speaking the Delegated Identity API with the hook speaking the SPIFFE
// Broker API, against one SPIRE 1.15.3 agent serving both, on both agent
// configurations (A: executable hashing, B: none), each API two ways:
// handed to a refresher that speaks it over its open connection, and with
// no refresher (spiffe-oci-hook-direct speaking it), with spiffe-helper
// one-shot as the yardstick. It writes its own section of BENCHMARKS.md.
func TestBenchBrokerAPI(t *testing.T) {
	benchAsRoot(t, "runc, mounts, SPIRE's unix attestor")
	root := testhelp.RepoRoot(t)
	work := testhelp.ShortTempDir(t, "bench-")
	b := build(t, root, work)
	rounds := envInt("BENCH_ROUNDS", 60)

	progress("starting SPIRE %s with the admin socket and the broker endpoint", spiretest.V115)
	s := spiretest.Start(t, spiretest.Options{TrustDomain: trustDomain, AuthorizedDelegates: []string{hookID, refresherID}, Broker: true, Brokers: []string{refresherID}})
	dir := testhelp.ShortTempDir(t, "bbr-")
	stateDir := filepath.Join(dir, "state")
	testhelp.MountTmpfs(t, stateDir, "mode=0700,size=64m")
	helperDir := filepath.Join(dir, "helper")
	testhelp.MountTmpfs(t, helperDir, "mode=0700,size=16m")
	// The refresher's part: the broker SVID for the hook (the harness's
	// own, which the broker endpoint admits).
	if err := brokersvid.Write(files.Writer{}, brokersvid.Dir(stateDir), s.HarnessIdentity(t)); err != nil {
		t.Fatal(err)
	}
	// The handed-over paths: a state directory per API that a refresher
	// speaking it serves.
	servedDirs := map[string]string{}
	for _, api := range []string{"delegated", "broker"} {
		servedDirs[api] = filepath.Join(dir, "served-"+api)
		testhelp.MountTmpfs(t, servedDirs[api], "mode=0700,size=64m")
	}
	configs := map[string]string{
		"delegated":              fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\ntimeout: 10s\n", s.AdminSocket, stateDir),
		"broker":                 fmt.Sprintf("agent_api: broker\nbroker_socket: %s\nstate_dir: %s\ntimeout: 10s\n", s.BrokerSocket, stateDir),
		"delegated, handed over": fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\ntimeout: 10s\n", s.AdminSocket, servedDirs["delegated"]),
		"broker, handed over": fmt.Sprintf("agent_api: broker\nbroker_socket: %s\nworkload_api_socket: %s\nbroker_spiffe_id: %s\nstate_dir: %s\ntimeout: 10s\n",
			s.BrokerSocket, s.WorkloadSocket, refresherID, servedDirs["broker"]),
	}
	stores := map[string]statedir.Store{
		"delegated": {Dir: stateDir}, "broker": {Dir: stateDir},
		"delegated, handed over": {Dir: servedDirs["delegated"]}, "broker, handed over": {Dir: servedDirs["broker"]},
	}
	runcRoot := filepath.Join(dir, "runc")
	initPath := runcInitPath(t, dir, runcRoot)
	s.CreateEntry(t, hookID, []string{"unix:uid:0", "unix:path:" + b.hookDirect}, time.Hour)
	s.CreateEntry(t, refresherID, []string{"unix:uid:0", "unix:path:" + b.refresher}, time.Hour)
	s.CreateEntry(t, workloadID, []string{"unix:uid:0", "unix:path:" + initPath}, time.Hour)
	s.CreateEntry(t, helperID, []string{"unix:uid:0", "unix:path:" + b.helper}, time.Hour)
	s.WaitSynced(t, 0)

	apis := []string{"delegated", "broker", "delegated, handed over", "broker, handed over"}
	logs := map[string]string{}
	bundles := map[string]string{"no hook": newBundle(t, dir, "nohook", nil, false)}
	for _, api := range apis {
		file := strings.ReplaceAll(strings.ReplaceAll(api, ",", ""), " ", "-")
		config := filepath.Join(dir, file+".yaml")
		writeFile(t, config, configs[api])
		logs[api] = filepath.Join(dir, "hook-"+file+".log")
		bundles[api] = newBundle(t, dir, file, []rspec.Hook{{Path: b.wrap, Args: []string{"hookwrap", "time", logs[api], b.hook, "spiffe-oci-hook", "--config", config}}}, true)
	}
	oneshot := filepath.Join(helperDir, "oneshot")
	os.MkdirAll(oneshot, 0o755)
	helperConf := filepath.Join(dir, "helper.conf")
	writeFile(t, helperConf, helperConfig(s.WorkloadSocket, oneshot, false))

	seq := 0
	run := func(name string) (string, time.Duration) {
		seq++
		id := fmt.Sprintf("bbr-%d", seq)
		d, stderr, err := runc(bundles[name], runcRoot, id)
		if err != nil {
			t.Fatalf("runc run (%s): %v\n%s", name, err, stderr)
		}
		return id, d
	}
	// attestations counts the agent's attestations (its debug lines for
	// a pid, by the Delegated Identity API or a reference, by the Broker
	// API) over n deliveries of api, run back to back.
	attestations := func(api string, n int) float64 {
		count := func() int {
			data, _ := os.ReadFile(s.AgentLog)
			return strings.Count(string(data), "PID attested to have selectors") + strings.Count(string(data), "Reference attested to have selectors")
		}
		before := count()
		for range n {
			run(api)
		}
		time.Sleep(500 * time.Millisecond) // the agent's log lines of the last run
		return float64(count()-before) / float64(n)
	}

	var results []apiResult
	var helper [][]time.Duration
	var baseline [][]time.Duration
	for i, ac := range []string{"A (executable hashing)", "B (workload_size_limit = -1)"} {
		if i == 1 && !noHashing(t, s, "configuration B") {
			break
		}
		var stops []func()
		for _, api := range []string{"delegated, handed over", "broker, handed over"} {
			stops = append(stops, startServing(t, b.refresher, filepath.Join(dir, strings.ReplaceAll(strings.ReplaceAll(api, ",", ""), " ", "-")+".yaml"), stores[api]))
		}
		progress("%s: %d interleaved rounds (+%d warm-up) of no hook, %s, spiffe-helper one-shot", ac, rounds, warmup, strings.Join(apis, "; "))
		res := map[string]*apiResult{}
		for _, api := range apis {
			res[api] = &apiResult{agent: ac, api: api, attestations: attestations(api, 10)}
		}
		var none, help []time.Duration
		n := len(apis) + 2 // no hook, each path, spiffe-helper
		for round := -warmup; round < rounds; round++ {
			for k := range n {
				switch v := (k + round + warmup) % n; v {
				case 0:
					_, d := run("no hook")
					if round >= 0 {
						none = append(none, d)
					}
				case n - 1:
					d := runHelper(t, b.helper, "-config", helperConf)
					if round >= 0 {
						help = append(help, d)
					}
				default:
					api := apis[v-1]
					id, d := run(api)
					// A handed-over container's state is the refresher's,
					// which removes it once /bin/true exits: its delivery
					// shows in the refresher's count (startServing).
					if round == 0 && !strings.Contains(api, "handed over") {
						checkFiles(t, stores[api].DeliveryDir(id, 0), workloadID)
					}
					if err := stores[api].Remove(id); err != nil {
						t.Fatal(err)
					}
					if round >= 0 {
						res[api].create = append(res[api].create, d)
						res[api].hook = append(res[api].hook, hookTime(t, logs[api], id))
					}
				}
			}
		}
		for _, stop := range stops {
			stop()
		}
		for _, api := range apis {
			results = append(results, *res[api])
		}
		baseline, helper = append(baseline, none), append(helper, help)
	}
	md := brokerReport(results, baseline, helper, rounds)
	fmt.Print("\n" + md + "\n")
	writeBenchSection(t, root, "broker-api", md)
}

// noHashing restarts the agent with workload_size_limit = -1 (the runc
// part's last pass, the broker part's configuration B); false, after
// saying that it skips what (the pass that needs it), if the agent's
// configuration is not as expected.
func noHashing(t *testing.T, s *spiretest.SPIRE, what string) bool {
	conf := filepath.Join(s.Dir, "agent.conf")
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	const key = "discover_workload_path = true"
	if strings.Count(string(data), key) != 1 {
		progress("agent.conf has no single %q; skipping %s", key, what)
		return false
	}
	progress("restarting the agent with workload_size_limit = -1 (no executable hashing)")
	s.StopAgent(t)
	writeFile(t, conf, strings.Replace(string(data), key, key+"\n            workload_size_limit = -1", 1))
	s.StartAgent(t)
	s.WaitSynced(t, 0)
	return true
}

func brokerReport(rs []apiResult, baseline, helper [][]time.Duration, rounds int) string {
	var b strings.Builder
	b.WriteString("## The Broker API against the Delegated Identity API\n\n")
	fmt.Fprintf(&b, "Generated by `make bench BENCH_PARTS=broker` (test/bench, TestBenchBrokerAPI) on %s: one SPIRE %s agent serving both APIs (admin socket and experimental.broker), the hook run by runc at createRuntime under test/bench/hookwrap (which times the hook process from fork to reap), %d interleaved rounds after %d warm-up rounds per agent configuration, in each round `runc run` of busybox `/bin/true` without hook, with the hook speaking each API, and spiffe-helper one-shot. With the Broker API the hook presents the broker SVID from the state directory (written as the refresher writes it) over mutual TLS. Attestations are the agent's own debug lines (\"PID attested to have selectors\", \"Reference attested to have selectors\") over 10 deliveries run back to back.\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), spiretest.V115, rounds, warmup)
	b.WriteString("| Agent | API | runc run, median | hook-added create latency, median | hook wall time, median (p90) | spiffe-helper one-shot, median | hook / spiffe-helper | agent attestations per delivery |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
	for i, r := range rs {
		cfg := i / 4
		create, hook, help := median(r.create), median(r.hook), median(helper[cfg])
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s (%s) | %s | %.2f | %.1f |\n", r.agent, r.api, ms(create), ms(create-median(baseline[cfg])),
			ms(hook), ms(stat{Samples: r.hook}.P(0.9)), ms(help), float64(hook)/float64(help), r.attestations)
	}
	b.WriteString("\nMedians of each variant's own samples; the hook-added latency is the variant's median less the same round set's no-hook median.\n")
	b.WriteString(brokerReading(rs))
	return b.String()
}

// brokerReading says, from the numbers, whether the broker path's fewer
// attestations show in the hook's wall time, per agent configuration and
// path (rs holds, for each configuration, delegated and broker with no
// refresher, then delegated and broker handed over).
func brokerReading(rs []apiResult) string {
	var b strings.Builder
	b.WriteString("\n**What it shows.**")
	for i := 0; i+1 < len(rs); i += 2 {
		del, brk := rs[i], rs[i+1]
		fewer := brk.attestations < del.attestations
		delta := median(brk.hook) - median(del.hook)
		path := "no refresher"
		if strings.Contains(del.api, "handed over") {
			path = "handed to the refresher"
		}
		fmt.Fprintf(&b, " %s, %s: the broker path made %.1f attestations per delivery against %.1f", del.agent, path, brk.attestations, del.attestations)
		switch {
		case !fewer:
			b.WriteString(", so it did not need fewer here;")
		case delta < 0:
			fmt.Fprintf(&b, ", and it shows: the hook's median wall time is %s shorter;", ms(-delta))
		default:
			fmt.Fprintf(&b, ", but it does not show in time: the hook's median wall time is %s longer, the mutual TLS handshake costing more than the attestations it saves when attesting is cheap;", ms(delta))
		}
	}
	b.WriteString(" the delegated path attests the caller once per RPC (bundles and SVIDs) besides the container's pid, the broker path only the referenced pid, its caller being authenticated by its X.509-SVID.\n")
	return b.String()
}

// writeBenchSection writes section name of BENCHMARKS.md.
func writeBenchSection(t *testing.T, root, name, md string) {
	t.Helper()
	path, err := benchmd.WriteSection(root, name, md)
	if err != nil {
		t.Fatal(err)
	}
	if path != "" {
		progress("wrote section %q of %s", name, path)
	}
}
