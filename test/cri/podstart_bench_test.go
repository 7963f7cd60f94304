package cri

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/test/benchmd"
)

// Pod start as a user of each pattern sees it: from `crictl runp` until
// the app container runs with its identity files present. The app says so
// by writing a file into a host directory; the benchmark polls for it
// every millisecond.

// pattern is one way for a pod's app to get its identity.
type pattern int

const (
	noIdentity pattern = iota // no identity at all
	annotated                 // this project: the annotation, the hook delivers at createRuntime
	initHelper                // spiffe-helper one-shot as an init container, then the app
	sidecar                   // spiffe-helper daemon as a sidecar; the app waits for the files
	nPatterns
)

func (p pattern) String() string {
	return [...]string{"no identity", "annotation (spiffe-oci-hook)", "spiffe-helper init container (one-shot)", "spiffe-helper sidecar (daemon), app waits for files"}[p]
}

// filesThere is true in a container once all three files are there.
const filesThere = "test -s /certs/svid.pem && test -s /certs/svid_key.pem && test -s /certs/svid_bundle.pem"

// podStart is one pod start's timing.
type podStart struct {
	total  time.Duration // runp until the app's ready file exists
	runp   time.Duration
	create time.Duration // crictl create of the app container
	start  time.Duration // crictl start of the app container
	helper time.Duration // init: runp done until the init container wrote init-done; sidecar: its create + start
}

// podStartRig runs the patterns' pods on one runtime.
type podStartRig struct {
	r       *runtime
	helper  string // a static spiffe-helper, mounted into its containers
	socket  string // the agent's Workload API socket directory
	confDir string // helper.conf for one-shot and daemon mode
	seq     int
}

func newPodStartRig(t *testing.T, r *runtime, helper string) *podStartRig {
	t.Helper()
	g := &podStartRig{r: r, helper: helper, socket: filepath.Dir(r.node.spire.WorkloadSocket), confDir: filepath.Join(r.dir, "helper-conf")}
	os.MkdirAll(g.confDir, 0o755)
	for name, daemon := range map[string]bool{"oneshot.conf": false, "daemon.conf": true} {
		conf := fmt.Sprintf(`agent_address = "/run/spire/%s"
cert_dir = "/certs"
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
daemon_mode = %v
`, filepath.Base(r.node.spire.WorkloadSocket), daemon)
		if err := os.WriteFile(filepath.Join(g.confDir, name), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return g
}

// run starts one pod of pattern p, times it, checks what the app got,
// and removes the pod (not timed).
func (g *podStartRig) run(t *testing.T, p pattern) podStart {
	t.Helper()
	g.seq++
	host := filepath.Join(g.r.dir, "ps", fmt.Sprint(g.seq))
	certs, out := filepath.Join(host, "certs"), filepath.Join(host, "out")
	for _, d := range []string{certs, out} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	defer os.RemoveAll(host)
	outM := mount{host: out, container: "/out"}
	certsM := mount{host: certs, container: "/certs"}
	helperMs := g.mounts(certs, out)
	var ann map[string]string
	if p == annotated {
		ann = map[string]string{annotation: "- cert_dir: /certs\n"}
	}
	pd := g.r.newPod(fmt.Sprintf("ps-%d", g.seq), "ps", "ps", ann)
	defer pd.remove()

	var s podStart
	begin := time.Now()
	if err := pd.start(); err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	s.runp = time.Since(begin)
	appMs := []mount{outM}
	app := "echo > /out/ready"
	switch p {
	case annotated:
		app = filesThere + " && echo > /out/ready"
	case initHelper:
		t0 := time.Now()
		c, err := pd.createWith("init", 0, "/opt/spiffe-helper -config /opt/conf/oneshot.conf && echo > /out/init-done", helperMs...)
		if err == nil {
			err = c.start()
		}
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		waitFile(t, filepath.Join(out, "init-done"), p)
		s.helper = time.Since(t0)
		appMs = append(appMs, certsM)
		app = filesThere + " && echo > /out/ready"
	case sidecar:
		t0 := time.Now()
		c, err := pd.createWith("helper", 0, helperDaemon, helperMs...)
		if err == nil {
			err = c.start()
		}
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		s.helper = time.Since(t0)
		appMs = append(appMs, certsM)
		app = "until " + filesThere + "; do sleep 0.005; done; echo > /out/ready"
	}
	t1 := time.Now()
	c, err := pd.createWith("app", 0, app, appMs...)
	if err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	t2 := time.Now()
	if err := c.start(); err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	s.create, s.start = t2.Sub(t1), time.Since(t2)
	waitFile(t, filepath.Join(out, "ready"), p)
	s.total = time.Since(begin)

	if p == initHelper || p == sidecar {
		svid, err := x509svid.Load(filepath.Join(certs, "svid.pem"), filepath.Join(certs, "svid_key.pem"))
		if err != nil {
			t.Fatalf("%s: the helper's files: %v", p, err)
		}
		if got := svid.ID.String(); got != workloadID("ps", "ps") {
			t.Fatalf("%s: the helper got %s", p, got)
		}
	}
	return s
}

// startHelper runs a spiffe-helper daemon sidecar in pod p, writing into
// a new host directory, which it returns.
func (g *podStartRig) startHelper(p *pod) (string, error) {
	host := filepath.Join(g.r.dir, "sc", p.uid)
	certs, out := filepath.Join(host, "certs"), filepath.Join(host, "out")
	for _, d := range []string{certs, out} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	c, err := p.createWith("helper", 0, helperDaemon, g.mounts(certs, out)...)
	if err == nil {
		err = c.start()
	}
	return certs, err
}

// helperDaemon runs spiffe-helper in daemon mode until the container is
// stopped (as a pid namespace's init, sh would ignore SIGTERM).
const helperDaemon = "/opt/spiffe-helper -config /opt/conf/daemon.conf & trap 'kill $!; exit 0' TERM; wait"

// mounts are what a spiffe-helper container has: the emptyDir-like host
// directory at /certs, the marker directory at /out, the helper and its
// configurations, and the agent's Workload API socket directory.
func (g *podStartRig) mounts(certs, out string) []mount {
	return []mount{
		{host: certs, container: "/certs"}, {host: out, container: "/out"},
		{host: g.helper, container: "/opt/spiffe-helper", readonly: true},
		{host: g.confDir, container: "/opt/conf", readonly: true},
		{host: g.socket, container: "/run/spire"},
	}
}

// waitFile polls for path every millisecond, for up to 30 s.
func waitFile(t *testing.T, path string, p pattern) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s never appeared: the app did not find its files", p, filepath.Base(path))
		}
		time.Sleep(time.Millisecond)
	}
}

// staticHelper builds spiffe-helper from test/spire's pinned module
// without cgo: the one SPIRE_BIN_DIR holds is linked against the host's
// libc, which the busybox image lacks.
func staticHelper(t *testing.T) string {
	t.Helper()
	out := filepath.Join(toolDir, "spiffe-helper-static")
	cmd := exec.Command("go", "build", "-mod=readonly", "-o", out, "github.com/spiffe/spiffe-helper/cmd/spiffe-helper")
	cmd.Dir = filepath.Join(repoRoot, "test", "spire")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building a static spiffe-helper: %v\n%s", err, b)
	}
	return out
}

// podStartResult is one runtime × agent configuration.
type podStartResult struct {
	runtime, agent string
	by             [nPatterns][]podStart
	crictl         samples // `crictl version`: what one crictl call costs
	// hookWall is the hook process's wall time as a wrapper logged it, and
	// timed the annotated pods' starts under that wrapper.
	hookWall samples
	timed    []podStart
}

func (r *podStartResult) col(p pattern, f func(podStart) time.Duration) samples {
	var s samples
	for _, x := range r.by[p] {
		s = append(s, f(x))
	}
	return s
}

// paired is the median over rounds of (pattern p − no identity).
func (r *podStartResult) paired(p pattern) time.Duration {
	var d samples
	for i := range r.by[p] {
		d = append(d, r.by[p][i].total-r.by[noIdentity][i].total)
	}
	return d.median()
}

// TestBenchPodStart (make bench) times pod start under each pattern, on
// CRI-O and containerd, on both agent configurations, the patterns in a
// new random order every round.
func TestBenchPodStart(t *testing.T) {
	benchmd.On(t)
	requireTools(t)
	rounds := envInt("BENCH_POD_ROUNDS", 30)
	warmup := 3
	helper := staticHelper(t)
	var results []*podStartResult
	for _, rt := range envList("BENCH_RUNTIMES", []string{"crio", "containerd"}) {
		t.Run(rt, func(t *testing.T) {
			n := newNode(t, tempDir(t, "bn-"))
			n.shortLived = true // its pods' containers exit at once
			var r *runtime
			switch rt {
			case "crio":
				r = startCRIO(t, n)
			case "containerd":
				r = startContainerd(t, n).runtime
			default:
				t.Fatalf("BENCH_RUNTIMES: unknown runtime %q", rt)
			}
			n.register(t, "ps", "ps", time.Hour)
			g := newPodStartRig(t, r, helper)
			for i, ac := range agentConfigs {
				if i == 1 {
					agentNoHashing(t, n)
				}
				res := &podStartResult{runtime: rt, agent: ac.name}
				for round := range warmup + rounds {
					order := rand.Perm(int(nPatterns))
					var got [nPatterns]podStart
					for _, p := range order {
						got[p] = g.run(t, pattern(p))
					}
					t0 := time.Now()
					r.run("version")
					if round < warmup {
						continue
					}
					res.crictl = append(res.crictl, time.Since(t0))
					for p := range nPatterns {
						res.by[p] = append(res.by[p], got[p])
					}
				}
				// Where the annotation's time goes: the hook's own wall
				// time, against the runtime's create and start.
				restore := wrapHook(t, n)
				log := filepath.Join(n.dir, "hook-times.log")
				for range max(rounds/2, 5) {
					res.timed = append(res.timed, g.run(t, annotated))
				}
				restore()
				res.hookWall = hookTimes(t, log)
				t.Logf("%s %s: none %s, annotation %s, init %s, sidecar %s (medians)", rt, ac.name,
					msf(res.col(noIdentity, total).median()), msf(res.col(annotated, total).median()),
					msf(res.col(initHelper, total).median()), msf(res.col(sidecar, total).median()))
				results = append(results, res)
			}
		})
	}
	writeSection(t, "pod-start", podStartReport(results, rounds, warmup))
}

// wrapHook puts a shell wrapper where the hook is installed, which logs
// the real hook's wall time (between two `date +%s%N`, so one date exec
// is counted in) to <node>/hook-times.log; the real hook moves beside it,
// with an entry for its new path. The returned func puts it back.
func wrapHook(t *testing.T, n *node) func() {
	t.Helper()
	real := n.hookBin + ".real"
	if !n.entries[real] {
		n.entries[real] = true
		n.spire.CreateEntry(t, hookID, []string{"unix:uid:0", "unix:path:" + real}, time.Hour)
		n.waitSynced(t)
	}
	log := filepath.Join(n.dir, "hook-times.log")
	os.Remove(log)
	script := fmt.Sprintf("#!/bin/sh\ns=$(date +%%s%%N)\n%s \"$@\"\nrc=$?\necho \"$s $(date +%%s%%N) $rc\" >> %s\nexit $rc\n", real, log)
	if err := os.Rename(n.hookBin, real); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.hookBin+".tmp", []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(n.hookBin+".tmp", n.hookBin); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := os.Rename(real, n.hookBin); err != nil {
			t.Fatal(err)
		}
	}
}

// hookTimes reads the wrapper's log.
func hookTimes(t *testing.T, log string) samples {
	t.Helper()
	data, err := os.ReadFile(log)
	if err != nil {
		t.Fatalf("the hook wrapper logged nothing: %v", err)
	}
	var s samples
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		var a, b, rc int64
		if _, err := fmt.Sscan(line, &a, &b, &rc); err != nil || rc != 0 {
			t.Fatalf("hook wrapper log line %q (%v)", line, err)
		}
		s = append(s, time.Duration(b-a))
	}
	return s
}

func total(s podStart) time.Duration { return s.total }

func podStartReport(rs []*podStartResult, rounds, warmup int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "## Pod start under CRI-O and containerd: this project against spiffe-helper\n\n")
	fmt.Fprintf(&b, "Generated by `make bench` (test/cri, TestBenchPodStart) on %s; %d rounds per runtime and agent configuration after %d warm-up rounds, the four patterns in a new random order every round. BENCH_POD_ROUNDS and BENCH_RUNTIMES change them.\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"), rounds, warmup)
	fmt.Fprintf(&b, "Time from `crictl runp` until the app container runs and has its identity files: the app writes a file into a host directory once `svid.pem`, `svid_key.pem` and `svid_bundle.pem` are all there, and the benchmark polls for that file every millisecond. Every step is one crictl call, as the kubelet makes one CRI call; a crictl call costs what `crictl version` costs (row below) on top of the runtime's own work, and the init and sidecar patterns make two more calls than the others.\n\n")
	b.WriteString("| Runtime | Agent | Pattern | median | p95 | paired Δ vs no identity (median) | runp | app create | app start | helper container |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rs {
		for p := range nPatterns {
			tot := r.col(p, total)
			d := "—"
			if p != noIdentity {
				d = signed(r.paired(p))
			}
			h := "—"
			if p == initHelper || p == sidecar {
				h = msf(r.col(p, func(s podStart) time.Duration { return s.helper }).median())
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.runtime, r.agent, p, msf(tot.median()), msf(tot.p95()), d,
				msf(r.col(p, func(s podStart) time.Duration { return s.runp }).median()),
				msf(r.col(p, func(s podStart) time.Duration { return s.create }).median()),
				msf(r.col(p, func(s podStart) time.Duration { return s.start }).median()), h)
		}
		fmt.Fprintf(&b, "| %s | %s | one `crictl version` call | %s | %s | | | | | |\n", r.runtime, r.agent, msf(r.crictl.median()), msf(r.crictl.p95()))
	}
	b.WriteString("\n**Target: this project adds at most 0.25× what the init-container pattern adds, on both runtimes** (paired Δ medians).\n\n")
	b.WriteString("| Runtime | Agent | annotation adds | init container adds | ratio | sidecar adds | Verdict |\n|---|---|---:|---:|---:|---:|---|\n")
	for _, r := range rs {
		a, i, s := r.paired(annotated), r.paired(initHelper), r.paired(sidecar)
		ratio := float64(a) / float64(i)
		v := "met"
		if ratio > 0.25 {
			v = fmt.Sprintf("**missed** (%.3f > 0.25)", ratio)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %.2f | %s | %s |\n", r.runtime, r.agent, signed(a), signed(i), ratio, signed(s), v)
	}
	b.WriteString("\n**Target: the annotation adds at most 15 ms to a pod's start on CRI-O** (paired Δ median against a pod with no identity; the node's refresher takes each container over from the hook).\n\n")
	b.WriteString("| Runtime | Agent | annotation adds | Verdict |\n|---|---|---:|---|\n")
	for _, r := range rs {
		if r.runtime != "crio" {
			continue
		}
		a := r.paired(annotated)
		v := "met"
		if a > 15*time.Millisecond {
			v = fmt.Sprintf("**missed** by %s", signed(a-15*time.Millisecond))
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", r.runtime, r.agent, signed(a), v)
	}
	b.WriteString("\n**Where the annotation's time goes.** After the rounds above, annotated pods again (half as many runs, at least 5), with the installed hook replaced by a shell wrapper that logs the real hook's wall time (fork to exit, plus one `date` exec); the create and start differences are from the unwrapped rounds above. The runtime runs the hook in `crictl create` under CRI-O and in `crictl start` under containerd (the NRI plugin adds it to the container's OCI spec at CreateContainer; runc runs it when the shim creates the task at start).\n\n")
	b.WriteString("| Runtime | Agent | hook wall time, wrapped runs (median, p95) | app create: annotation − no identity (medians) | app start: annotation − no identity (medians) | rest: runtime's create+start Δ − hook wall |\n|---|---|---:|---:|---:|---:|\n")
	for _, r := range rs {
		if len(r.hookWall) == 0 {
			continue
		}
		create := func(s podStart) time.Duration { return s.create }
		start := func(s podStart) time.Duration { return s.start }
		dc := r.col(annotated, create).median() - r.col(noIdentity, create).median()
		ds := r.col(annotated, start).median() - r.col(noIdentity, start).median()
		fmt.Fprintf(&b, "| %s | %s | %s, %s | %s | %s | %s |\n", r.runtime, r.agent, msf(r.hookWall.median()), msf(r.hookWall.p95()), signed(dc), signed(ds), signed(dc+ds-r.hookWall.median()))
	}
	for _, r := range rs {
		if r.runtime != "containerd" || len(r.hookWall) == 0 {
			continue
		}
		create := func(s podStart) time.Duration { return s.create }
		start := func(s podStart) time.Duration { return s.start }
		dc := r.col(annotated, create).median() - r.col(noIdentity, create).median()
		ds := r.col(annotated, start).median() - r.col(noIdentity, start).median()
		fmt.Fprintf(&b, "\nUnder containerd, agent %s: the annotation's cost sits in start (%s), where runc runs the hook while the shim creates the task; the hook process itself took %s of it. The NRI plugin's round trip belongs to CreateContainer, the create column, which moved by %s. What is left of start's difference, %s, is runc running a hook at all (fork, exec, the state on stdin, waiting) and the wrapper's own `date`.\n", r.agent, signed(ds), msf(r.hookWall.median()), signed(dc), signed(ds-r.hookWall.median()))
	}
	b.WriteString("\nAgent configurations: " + agentConfigs[0].name + ": " + agentConfigs[0].desc + "; " + agentConfigs[1].name + ": " + agentConfigs[1].desc + ".\n\n")
	b.WriteString("How the patterns run. Every pod is a host-network pod of namespace `ps`, service account `ps`, with one entry for it (`k8s:ns:ps`, `k8s:sa:ps`, pod-level selectors, which match every container of the pod). **No identity**: the app writes its ready file. **Annotation**: the pod carries `identity.noderesource.dev/container: - cert_dir: /certs`; the hook (CRI-O: hooks.d; containerd: injected by spiffe-oci-nri) delivers the files at createRuntime; the app checks them and writes its ready file. **Init container**: spiffe-helper v0.11.0 (built without cgo from test/spire's pinned module, so that it runs in the busybox image) runs one-shot (`daemon_mode = false`) in a first container with the agent's Workload API socket directory and a host directory (the emptyDir) mounted; when it has exited (it writes a marker the benchmark polls for every millisecond: faster than a kubelet, which learns of the exit through its pod lifecycle events), the app container is created and started with the same host directory at /certs. **Sidecar**: spiffe-helper in daemon mode in a first container, then the app container right after it (as the kubelet starts a pod's containers in order, without waiting), which polls every 5 ms until the three files are there.\n\n")
	return b.String()
}
