package cri

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/status"

	"github.com/noderesource/spiffe-oci-hook/test/benchmd"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// nodeResult is what TestBenchNode measured.
type nodeResult struct {
	pods, groups, batch, rotations int
	ttl                            time.Duration

	start       time.Duration // all pods started
	createStart samples       // crictl create + start of each annotated app container
	agentStart  time.Duration // agent CPU while the pods started (attestations, fetches for the hook, subscriptions)

	window       time.Duration // the rotation window both phases are measured over
	refMem       procMem
	refCPU       time.Duration // refresher CPU over the window
	agentMem     procMem       // with the refresher's subscriptions
	agentCPU     time.Duration // over the window
	reach        samples
	sweep        time.Duration // median time of one sweep over all pods' files
	rounds       int           // rotations seen complete in the window
	fails        []string
	agentBack    time.Duration // agent started again → every pod held a new certificate
	agentBackCPU time.Duration // agent CPU from its start to then
	agentStreams time.Duration // agent started → the refresher's status shows every stream answered
	refReady     time.Duration // refresher restarted → READY=1 (every record read, every stream opened)
	refStreams   time.Duration // refresher restarted → its status shows every container's SVID stream answered, no error
	refServed    time.Duration // refresher restarted → next rotation in every pod's files

	helpers      int
	helperStart  time.Duration
	helperPSS    int64 // KiB, all daemons
	helperRSS    int64
	agentMemH    procMem // with the helpers' Workload API streams
	agentCPUH    time.Duration
	helperCPU    time.Duration // all daemons over the window
	helperRounds int
}

// TestBenchNode (make bench) runs a full node under CRI-O with the real
// agent: BENCH_NODE_PODS pods (110, the kubelet's default max-pods)
// across 10 namespace/service-account groups, started 10 at a time, with
// BENCH_NODE_TTL X.509 SVIDs (2m), through BENCH_NODE_ROTATIONS rotation
// rounds, an agent restart and a refresher SIGKILL, then the same number
// of pods each with a spiffe-helper daemon sidecar instead.
func TestBenchNode(t *testing.T) {
	benchmd.On(t)
	requireTools(t)
	res := &nodeResult{
		pods:      envInt("BENCH_NODE_PODS", 110),
		groups:    envInt("BENCH_NODE_GROUPS", 10),
		batch:     envInt("BENCH_NODE_BATCH", 10),
		rotations: envInt("BENCH_NODE_ROTATIONS", 3),
		ttl:       envDuration("BENCH_NODE_TTL", 2*time.Minute),
	}
	helper := staticHelper(t)
	n := newNode(t, tempDir(t, "bn-"))
	// Its CPU is measured at the defaults: the test nodes' audit every
	// second and rescan every 2 s were most of it (0.80 s/min at 110 pods
	// on 2026-12-08, against 0.12 s/min before the audit existed).
	n.atDefaults = true
	n.restartRefresher(t)
	r := startCRIO(t, n)
	agent := n.agentPID()
	if agent == 0 {
		t.Fatal("cannot find the SPIRE agent's pid")
	}

	// The pods, 10 at a time.
	cpu0, t0 := procCPU(agent), time.Now()
	f := startFleet(t, r, fleetOptions{pods: res.pods, groups: res.groups, batch: res.batch, ttl: res.ttl})
	res.start, res.agentStart = time.Since(t0), procCPU(agent)-cpu0
	for _, m := range f.members {
		res.createStart = append(res.createStart, m.hookTime)
	}
	t.Logf("%d pods started in %s; create+start p50 %s p99 %s", res.pods, res.start.Round(time.Millisecond), msf(res.createStart.median()), msf(res.createStart.p99()))

	// Rotation rounds: the agent renews each SVID in the second half of
	// its life; the window runs over whole rounds.
	first, err := f.snapshot()
	if err != nil {
		t.Fatal(err)
	}
	w := f.watch(100 * time.Millisecond)
	refPID := n.refresher.Process.Pid
	// Begin the window at a round's completion, so that it covers whole
	// rounds.
	prev := serials(first)
	f.waitAllNew(t, prev, res.ttl+30*time.Second, "first rotation")
	snap, _ := f.snapshot()
	prev = serials(snap)
	rc0, ac0, w0 := procCPU(refPID), procCPU(agent), time.Now()
	for i := range res.rotations {
		f.waitAllNew(t, prev, res.ttl+30*time.Second, fmt.Sprintf("rotation %d", i+2))
		snap, _ := f.snapshot()
		prev = serials(snap)
		res.rounds++
		t.Logf("rotation round %d reached all %d pods", i+2, res.pods)
	}
	res.window = time.Since(w0)
	res.refCPU, res.agentCPU = procCPU(refPID)-rc0, procCPU(agent)-ac0
	res.refMem, res.agentMem = readProcMem(refPID), readProcMem(agent)

	// The agent restarts: files stay valid, every pod is served again.
	n.spire.StopAgent(t)
	// With the agent down, so that only the restarted agent's answers
	// count.
	before, _ := f.snapshot()
	time.Sleep(3 * time.Second)
	back := time.Now()
	n.spire.StartAgent(t)
	agent = n.agentPID()
	n.waitStreams(t, res.pods, 60*time.Second)
	res.agentStreams = time.Since(back)
	f.waitAllNew(t, serials(before), res.ttl, "after the agent's restart")
	res.agentBack, res.agentBackCPU = time.Since(back), procCPU(agent)
	t.Logf("agent restart: every pod held a new certificate %s after the agent was started again", res.agentBack.Round(time.Millisecond))

	// The refresher is SIGKILLed and restarted.
	n.refresher.Process.Signal(syscall.SIGKILL)
	n.refresher.Wait()
	before, _ = f.snapshot()
	// The first start's notify socket is still there.
	os.Remove(filepath.Join(n.dir, "notify.sock"))
	restart := time.Now()
	n.startRefresher(t, filepath.Join(n.prefix, "bin", "spiffe-oci-refresher"))
	res.refReady = time.Since(restart)
	n.waitStreams(t, res.pods, 60*time.Second)
	res.refStreams = time.Since(restart)
	f.waitAllNew(t, serials(before), res.ttl+30*time.Second, "rotation after the refresher's restart")
	res.refServed = time.Since(restart)
	t.Logf("refresher SIGKILL: READY after %s, every stream answered after %s, next rotation in every pod after %s", res.refReady.Round(time.Millisecond), res.refStreams.Round(time.Millisecond), res.refServed.Round(time.Millisecond))

	res.fails = w.stop()
	res.reach = w.reach(res.ttl)
	res.sweep = w.sweeps.median()
	if len(res.fails) > 0 {
		t.Errorf("%d checks of the pods' files failed, first ones:\n%s", len(res.fails), strings.Join(res.fails[:min(len(res.fails), 10)], "\n"))
	}

	// The same node with a spiffe-helper daemon sidecar per pod instead.
	f.each(res.batch, func(m *member) error { return m.pod.remove() })
	n.refresher.Process.Signal(syscall.SIGTERM)
	n.refresher.Wait()
	rig := newPodStartRig(t, r, helper)
	t0 = time.Now()
	h := startFleet(t, r, fleetOptions{pods: res.pods, groups: res.groups, batch: res.batch, ttl: res.ttl, sidecars: rig})
	var helpers []int
	poll.Eventually(t, 60*time.Second, "every sidecar wrote its files", func() bool {
		for _, m := range h.members {
			if _, err := os.Stat(filepath.Join(m.certs, "svid_bundle.pem")); err != nil {
				return false
			}
		}
		return true
	})
	res.helperStart = time.Since(t0)
	helpers = pidsByCmdline("/opt/spiffe-helper ")
	res.helpers = len(helpers)
	hc := func() time.Duration {
		var d time.Duration
		for _, p := range helpers {
			d += procCPU(p)
		}
		return d
	}
	certOf := func() []string {
		var s []string
		for _, m := range h.members {
			data, _ := os.ReadFile(filepath.Join(m.certs, "svid.pem"))
			s = append(s, string(data))
		}
		return s
	}
	// Over the same length of time as the refresher's window, counting
	// the rotation rounds that complete in it.
	hc0, ac0, w0 := hc(), procCPU(agent), time.Now()
	prevH := certOf()
	for time.Since(w0) < res.window {
		time.Sleep(time.Second)
		cur := certOf()
		all := true
		for i := range cur {
			all = all && cur[i] != prevH[i]
		}
		if all {
			res.helperRounds++
			prevH = cur
		}
	}
	res.helperCPU, res.agentCPUH = hc()-hc0, procCPU(agent)-ac0
	res.agentMemH = readProcMem(agent)
	for _, p := range helpers {
		m := readProcMem(p)
		res.helperPSS += m.pss
		res.helperRSS += m.rss
	}
	writeSection(t, "node", res.report())
}

// waitStreams waits until the refresher's status report shows want
// containers whose SVID stream the agent answered, none with an error.
func (n *node) waitStreams(t *testing.T, want int, d time.Duration) {
	t.Helper()
	c := status.NewClient(filepath.Join(n.stateDir, "refresher.sock"))
	poll.Eventually(t, d, "every container's stream answered", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		rep, err := c.Report(ctx)
		if err != nil {
			return false
		}
		open := 0
		for _, ct := range rep.Containers {
			if ct.StreamOpen && ct.Error == "" {
				open++
			}
		}
		return open >= want
	})
}

// poll waits for a condition every 100 ms: the conditions here ask the
// refresher's status socket or stat every pod's files, which a finer poll
// would make compete with the node it measures.
var poll = testhelp.Poll{Every: 100 * time.Millisecond}

func perMinute(d, window time.Duration) string {
	if window <= 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f s/min", d.Seconds()*float64(time.Minute)/float64(window))
}

func (res *nodeResult) report() string {
	var b strings.Builder
	fmt.Fprintf(&b, "## A full node under CRI-O with the real SPIRE agent\n\n")
	fmt.Fprintf(&b, "Generated by `make bench` (test/cri, TestBenchNode) on %s. %d pods across %d namespace/service-account pairs, one entry per pair (`k8s:ns`, `k8s:sa`, pod-level selectors), X.509 TTL %s, pods started %d at a time (crictl runp, create, start, as a kubelet would, %d concurrently). One real SPIRE v1.13.3 server and agent (agent configuration A: the unix attestor hashes executables; the k8s attestor asks a stand-in kubelet), CRI-O v1.34.0 with runc, the hook from hooks.d and the refresher as `make install` installs them, the refresher at its default intervals (retries backing off from 500 ms to 30 s, rescans and audits every 30 s). BENCH_NODE_PODS, BENCH_NODE_TTL and BENCH_NODE_ROTATIONS change the scale.\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), res.pods, res.groups, res.ttl, res.batch, res.batch)
	b.WriteString("| Measurement | Result |\n|---|---|\n")
	fmt.Fprintf(&b, "| pods started, %d at a time | %d in %s, no failure (any failure stops the benchmark) |\n", res.batch, res.pods, sec(res.start))
	fmt.Fprintf(&b, "| annotated app container: `crictl create` + `crictl start` (CRI-O runs the hook in create), under %d concurrent pod starts | p50 %s, p99 %s, max %s |\n", res.batch, msf(res.createStart.median()), msf(res.createStart.p99()), msf(res.createStart.max()))
	fmt.Fprintf(&b, "| agent CPU while the pods started (the refresher's fetches for the hook, attestations, its subscriptions) | %s, %s per pod |\n", sec(res.agentStart), msf(res.agentStart/time.Duration(res.pods)))
	fmt.Fprintf(&b, "| measurement window (whole rotation rounds of all %d pods) | %s, %d rounds |\n", res.pods, sec(res.window), res.rounds)
	fmt.Fprintf(&b, "| spiffe-oci-refresher: RSS / peak (VmHWM) / PSS | %s / %s / %s |\n", mibKB(res.refMem.rss), mibKB(res.refMem.hwm), mibKB(res.refMem.pss))
	fmt.Fprintf(&b, "| spiffe-oci-refresher: CPU over the window | %s (%s) |\n", sec(res.refCPU), perMinute(res.refCPU, res.window))
	fmt.Fprintf(&b, "| SPIRE agent with %d delegated subscriptions: RSS / PSS | %s / %s |\n", res.pods, mibKB(res.agentMem.rss), mibKB(res.agentMem.pss))
	fmt.Fprintf(&b, "| SPIRE agent: CPU over the window | %s (%s) |\n", sec(res.agentCPU), perMinute(res.agentCPU, res.window))
	fmt.Fprintf(&b, "| rotation reach: certificate issued (NotAfter − TTL; SPIRE backdates NotBefore) → the pod's files hold it, %d certificates | p50 %s, p99 %s, max %s (files swept every 100 ms; one sweep of all pods took %s) |\n", len(res.reach), sec(res.reach.median()), sec(res.reach.p99()), sec(res.reach.max()), msf(res.sweep))
	fmt.Fprintf(&b, "| pods' files checked throughout (readable, key matches, verifies against the bundle beside it, right SPIFFE ID, within validity) | %d failures |\n", len(res.fails))
	fmt.Fprintf(&b, "| agent restart (SIGTERM, 3 s down): agent started → the refresher's status shows all %d SVID streams answered again | %s |\n", res.pods, sec(res.agentStreams))
	fmt.Fprintf(&b, "| agent restart (SIGTERM, 3 s down): agent started → every pod holds a new certificate | %s; agent CPU from its start to then %s (%s per pod) |\n", sec(res.agentBack), sec(res.agentBackCPU), msf(res.agentBackCPU/time.Duration(res.pods)))
	fmt.Fprintf(&b, "| refresher SIGKILL: restarted → READY=1 (every record read) | %s |\n", sec(res.refReady))
	fmt.Fprintf(&b, "| refresher SIGKILL: restarted → all %d served again (its status socket shows every container's SVID stream answered by the agent, no error) | %s (target < 10 s: %s) |\n", res.pods, sec(res.refStreams), verdictWord(res.refStreams < 10*time.Second))
	fmt.Fprintf(&b, "| refresher SIGKILL: restarted → the next rotation in every pod's files | %s (bounded by the agent's rotation schedule, not by the refresher) |\n", sec(res.refServed))
	fmt.Fprintf(&b, "| **instead**: %d pods with a spiffe-helper v0.11.0 daemon sidecar each, no annotation, no refresher | %d daemons found; all wrote their files %s after the first runp |\n", res.pods, res.helpers, sec(res.helperStart))
	fmt.Fprintf(&b, "| %d spiffe-helper daemons: total PSS / total RSS | %s / %s |\n", res.helpers, mibKB(res.helperPSS), mibKB(res.helperRSS))
	fmt.Fprintf(&b, "| %d spiffe-helper daemons: CPU over a window of the same length | %s (%s), %d complete rotation rounds in it |\n", res.helpers, sec(res.helperCPU), perMinute(res.helperCPU, res.window), res.helperRounds)
	fmt.Fprintf(&b, "| SPIRE agent with %d Workload API clients: RSS / PSS | %s / %s |\n", res.helpers, mibKB(res.agentMemH.rss), mibKB(res.agentMemH.pss))
	fmt.Fprintf(&b, "| SPIRE agent: CPU over that window | %s (%s) |\n", sec(res.agentCPUH), perMinute(res.agentCPUH, res.window))
	fmt.Fprintf(&b, "\n**Is the agent the limit?** Starting %d pods cost the agent %s of CPU per pod (the hook hands each container to the refresher: the refresher's SVID stream for it attests runc init, through the k8s attestor's call to the kubelet, and the refresher as the caller; the refresher's subscription, once the container is recorded, attests the pid again); after its restart it spent %s per pod re-attesting every subscribed pid and minting, including its own start. In steady state it used %s for %d subscriptions (%s), and %s for %d spiffe-helper clients. The agent's share per pod start is what grows with churn, not with the number of running pods. What an operator should set: `workload_size_limit = -1` in the agent's unix attestor when no entry uses `unix:sha256` (configuration B of the pod-start section: it removes executable hashing from every attestation, those of the refresher's calls for the hook included); leave the refresher's defaults.\n",
		res.pods, msf(res.agentStart/time.Duration(res.pods)), msf(res.agentBackCPU/time.Duration(res.pods)), perMinute(res.agentCPU, res.window), res.pods, "agent CPU per minute", perMinute(res.agentCPUH, res.window), res.helpers)
	b.WriteString("\nRSS and PSS are read from /proc/PID/status and smaps_rollup at the end of each window; CPU is user + system time from /proc/PID/stat (10 ms ticks). The spiffe-helper daemons run as sidecar containers in the pods (static build of v0.11.0, in a busybox image); their own containers' conmon and runtime costs are not counted.\n\n")
	return b.String()
}

func verdictWord(ok bool) string {
	if ok {
		return "met"
	}
	return "**missed**"
}
