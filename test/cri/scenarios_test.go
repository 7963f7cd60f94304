package cri

import (
	"crypto/x509"
	"encoding/pem"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
)

// TestCRIO runs the scenarios under CRI-O, on one CRI-O and one SPIRE.
func TestCRIO(t *testing.T) {
	requireTools(t)
	n := newNode(t, tempDir(t, "cri-node-"))
	r := startCRIO(t, n)
	scenarios(t, r)
	t.Run("audit: CRI-O reads no directory with the hook's JSON", func(t *testing.T) { hooksDirMissing(t, r) })
}

// TestContainerd runs the scenarios under containerd with spiffe-oci-nri,
// on one containerd and one SPIRE, then what only containerd has.
func TestContainerd(t *testing.T) {
	requireTools(t)
	n := newNode(t, tempDir(t, "cri-node-"))
	c := startContainerd(t, n)
	scenarios(t, c.runtime)
	containerdOnly(t, c)
}

// scenarios are what both runtimes must do, on one runtime instance. The
// rotation watcher starts first and is checked last, so that its wait for
// the agent's renewal overlaps the other scenarios.
func scenarios(t *testing.T, r *runtime) {
	var rot *container
	rot = startRotationWatcher(t, r)
	t.Run("two pods in different namespaces each read their own identity first", func(t *testing.T) { twoNamespaces(t, r) })
	t.Run("a named annotation serves only its container", func(t *testing.T) { namedContainer(t, r) })
	t.Run("an init container gets its files", func(t *testing.T) { initContainer(t, r) })
	t.Run("a restarted container gets fresh files, the old state goes", func(t *testing.T) { restartedContainer(t, r) })
	t.Run("pod removal leaves no state and no mount", func(t *testing.T) { podRemoval(t, r) })
	t.Run("agent down: the hook's line and no container", func(t *testing.T) { agentDown(t, r) })
	t.Run("hostile annotations are refused with their line", func(t *testing.T) { hostileAnnotation(t, r) })
	t.Run("audit: a typo'd container name is reported", func(t *testing.T) { typoName(t, r) })
	t.Run("rotation: the refresher rotates a running container's files", func(t *testing.T) {
		if rot == nil {
			t.Fatal("the rotation watcher did not start")
		}
		checkRotation(t, rot)
	})
}

// printCert is the first thing a container does: print its certificate.
const printCert = `echo "=== cert ==="; cat /certs/svid.pem; echo "=== end cert ==="; `

// certs parses every certificate section a container printed and returns
// the leaf certificates.
func certs(t *testing.T, out string) []*x509.Certificate {
	t.Helper()
	var leaves []*x509.Certificate
	for {
		i := strings.Index(out, "=== cert ===\n")
		j := strings.Index(out, "=== end cert ===")
		if i < 0 || j < i {
			return leaves
		}
		block, _ := pem.Decode([]byte(out[i+len("=== cert ===\n") : j]))
		if block == nil {
			t.Fatalf("the container printed no PEM certificate:\n%s", out)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("the container's certificate: %v\n%s", err, out)
		}
		leaves = append(leaves, cert)
		out = out[j+len("=== end cert ==="):]
	}
}

// certID returns the SPIFFE ID of the first certificate a container
// printed.
func certID(t *testing.T, out string) string {
	t.Helper()
	cs := certs(t, out)
	if len(cs) == 0 {
		t.Fatalf("the container printed no certificate:\n%s", out)
	}
	id, err := x509svid.IDFromCert(cs[0])
	if err != nil {
		t.Fatal(err)
	}
	return id.String()
}

// idle keeps a container running until the runtime stops it: a shell as
// PID 1 ignores SIGTERM unless it traps it.
const idle = "trap 'exit 0' TERM; sleep 600 & wait"

var unnamed = map[string]string{annotation: "- cert_dir: /certs\n"}

// twoNamespaces: two pods in different namespaces, each with the unnamed
// annotation, each read their own SPIFFE ID as their command's first step.
func twoNamespaces(t *testing.T, r *runtime) {
	n := r.node
	idA := n.register(t, "shop", "default", time.Hour)
	idB := n.register(t, "bank", "default", time.Hour)
	metrics := filepath.Join(n.stateDir, "refresher.sock")
	handedOver := metricSum(t, metrics, "spiffe_oci_handoffs_total")
	a := r.runPod(t, "web", "shop", unnamed)
	b := r.runPod(t, "web", "bank", unnamed)
	ca := a.mustRun(t, "app", 0, printCert+"echo DONE")
	cb := b.mustRun(t, "app", 0, printCert+"echo DONE")
	if got := certID(t, ca.waitLog(t, "DONE")); got != idA {
		t.Errorf("pod in shop read %s, want %s", got, idA)
	}
	if got := certID(t, cb.waitLog(t, "DONE")); got != idB {
		t.Errorf("pod in bank read %s, want %s", got, idB)
	}
	// The hook handed both containers to the node's refresher.
	if got := metricSum(t, metrics, "spiffe_oci_handoffs_total"); got < handedOver+2 {
		t.Errorf("the refresher took %v containers over from the hook, want at least 2", got-handedOver)
	}
}

// namedContainer: identity.noderesource.dev/container.app on a two-container
// pod delivers to app only; the sidecar has no /certs and no state.
func namedContainer(t *testing.T, r *runtime) {
	id := r.node.register(t, "shop", "default", time.Hour)
	p := r.runPod(t, "two", "shop", map[string]string{annotation + ".app": "- cert_dir: /certs\n"})
	app := p.mustRun(t, "app", 0, printCert+"echo DONE; "+idle)
	side := p.mustRun(t, "sidecar", 0, `if [ -e /certs ]; then echo HAS-CERTS; ls -la /certs; else echo NO-CERTS; fi; `+idle)
	if got := certID(t, app.waitLog(t, "DONE")); got != id {
		t.Errorf("app read %s, want %s", got, id)
	}
	if out := side.waitLog(t, "CERTS"); !strings.Contains(out, "NO-CERTS") {
		t.Errorf("the sidecar, which no annotation names, has /certs:\n%s", out)
	}
	if got := r.node.statePaths(side.id); len(got) > 0 {
		t.Errorf("state for the sidecar: %v", got)
	}
	if got := r.node.statePaths(app.id); len(got) == 0 {
		t.Errorf("no state for app")
	}
}

// initContainer: an init container (the kubelet creates it like any
// other, before the app) with the pod's unnamed annotation gets its files
// before it runs; once it has exited its state goes.
func initContainer(t *testing.T, r *runtime) {
	id := r.node.register(t, "shop", "default", time.Hour)
	p := r.runPod(t, "withinit", "shop", unnamed)
	init := p.mustRun(t, "init", 0, printCert+"echo DONE")
	if got := certID(t, init.waitLog(t, "DONE")); got != id {
		t.Errorf("the init container read %s, want %s", got, id)
	}
	init.waitExited(t)
	r.node.waitStateGone(t, "the init container exited", init.id)
	app := p.mustRun(t, "app", 0, printCert+"echo DONE")
	if got := certID(t, app.waitLog(t, "DONE")); got != id {
		t.Errorf("the app container after init read %s, want %s", got, id)
	}
}

// restartedContainer: the kubelet restarts a container as a new container
// (attempt 1) in the same pod; it gets its own fresh delivery, and the old
// one's state goes once it has stopped (under CRI-O the poststop hook
// runs only at removal: the refresher's cleanup on exit does it), and
// nothing is left of it after its removal.
func restartedContainer(t *testing.T, r *runtime) {
	id := r.node.register(t, "shop", "default", time.Hour)
	p := r.runPod(t, "restart", "shop", unnamed)
	old := p.mustRun(t, "app", 0, printCert+"echo DONE; "+idle)
	if got := certID(t, old.waitLog(t, "DONE")); got != id {
		t.Fatalf("attempt 0 read %s, want %s", got, id)
	}
	old.stop(t)
	r.node.waitStateGone(t, "attempt 0 stopped", old.id)
	again := p.mustRun(t, "app", 1, printCert+"echo DONE; "+idle)
	if got := certID(t, again.waitLog(t, "DONE")); got != id {
		t.Errorf("attempt 1 read %s, want %s", got, id)
	}
	if got := r.node.statePaths(again.id); len(got) == 0 {
		t.Errorf("no state for attempt 1")
	}
	old.remove(t)
	if got := r.node.statePaths(old.id); len(got) > 0 {
		t.Errorf("state of attempt 0 after its removal: %v", got)
	}
}

// podRemoval: removing a pod (stopp, rmp) leaves nothing of its
// containers in the state directory and no mount on the host.
func podRemoval(t *testing.T, r *runtime) {
	r.node.register(t, "shop", "default", time.Hour)
	p := r.runPod(t, "gone", "shop", unnamed)
	a := p.mustRun(t, "a", 0, printCert+"echo DONE; "+idle)
	b := p.mustRun(t, "b", 0, printCert+"echo DONE; "+idle)
	a.waitLog(t, "DONE")
	b.waitLog(t, "DONE")
	if len(r.node.statePaths(a.id)) == 0 || len(r.node.statePaths(b.id)) == 0 {
		t.Fatalf("no state for the running containers")
	}
	// The runtime's mount namespace shows the running pod's mounts (its
	// sandbox's /dev/shm): the check after the removal looks in the right
	// place.
	if len(r.mounts(p.id)) == 0 {
		t.Fatalf("%s shows no mount of running pod %s", r.mountinfo, p.id)
	}
	if err := p.remove(); err != nil {
		t.Fatal(err)
	}
	r.node.waitStateGone(t, "pod removed", a.id, b.id)
	if m := r.mounts(a.id, b.id); len(m) > 0 {
		t.Errorf("mounts left after the pod's removal:\n%s", strings.Join(m, "\n"))
	}
	if m := r.mounts(r.node.stateDir + "/"); len(m) > 0 {
		t.Errorf("mounts under the state directory:\n%s", strings.Join(m, "\n"))
	}
}

// agentDown: with the agent stopped, creating an annotated container
// fails with the hook's one line in crictl's error, and the container
// never runs.
func agentDown(t *testing.T, r *runtime) {
	r.node.register(t, "shop", "default", time.Hour)
	p := r.runPod(t, "noagent", "shop", unnamed)
	r.node.spire.StopAgent(t)
	c, err := p.run(t, "app", 0, "echo STARTED; "+idle)
	r.node.spire.StartAgent(t)
	if err == nil {
		t.Fatalf("the container started with the agent down")
	}
	want := "agent admin socket " + r.node.spire.AdminSocket + " is missing"
	if r.node.api == config.APIBroker {
		want = "agent broker socket " + r.node.spire.BrokerSocket + " is missing"
	}
	if !strings.Contains(err.Error(), want) {
		t.Errorf("crictl's error lacks the hook's line %q:\n%v", want, err)
	}
	notRun(t, r, p, c)
}

// notRun checks that a container whose creation or start failed never ran
// its command and left no state.
func notRun(t *testing.T, r *runtime, p *pod, c *container) {
	t.Helper()
	if c != nil {
		// containerd: created, but its task never started.
		if st := c.state(t); st == "CONTAINER_RUNNING" {
			t.Errorf("the container is %s", st)
		}
		if out, _ := r.run("logs", c.id); strings.Contains(out, "STARTED") {
			t.Errorf("the container's command ran:\n%s", out)
		}
		if got := r.node.statePaths(c.id); len(got) > 0 {
			t.Errorf("state of the refused container: %v", got)
		}
	} else if ids := p.containers(t); len(ids) > 0 {
		// CRI-O: the create failed, so there is no container.
		t.Errorf("the pod has containers %v", ids)
	}
}

// hostileAnnotation: a cert_dir that climbs out of the container, and a
// spiffe_id of another namespace's identity, are refused; crictl's error
// carries the hook's line naming the annotation and the field, and the
// container never runs.
func hostileAnnotation(t *testing.T, r *runtime) {
	r.node.register(t, "shop", "default", time.Hour)
	bank := r.node.register(t, "bank", "default", time.Hour)
	for _, tc := range []struct {
		value string
		want  []string
	}{
		// runc's log quotes the hook's stderr, escaping its quotes.
		{"- cert_dir: /certs/../../etc\n", []string{"annotation " + annotation + ": delivery 0: cert_dir ", "/certs/../../etc", " must not contain '..'"}},
		{"- cert_dir: /certs\n  spiffe_id: " + bank + "\n", []string{"spiffe_id " + bank + " is not among the identities the agent returned for this container (" + workloadID("shop", "default") + ")"}},
	} {
		p := r.runPod(t, "hostile", "shop", map[string]string{annotation: tc.value})
		c, err := p.run(t, "app", 0, "echo STARTED; "+idle)
		if err == nil {
			t.Fatalf("the container started with annotation %q", tc.value)
		}
		for _, want := range append([]string{"spiffe-oci-hook: container "}, tc.want...) {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("crictl's error lacks %q:\n%v", want, err)
			}
		}
		notRun(t, r, p, c)
	}
}

// rotationTTL is the X.509 TTL of the rotation scenario's entry; the agent
// renews at half of it.
const rotationTTL = 20 * time.Second

// startRotationWatcher runs a container, in a namespace whose entry has a
// short TTL, that prints its certificate each time it changes.
func startRotationWatcher(t *testing.T, r *runtime) *container {
	r.node.register(t, "rotate", "default", rotationTTL)
	p := r.runPod(t, "watch", "rotate", unnamed)
	return p.mustRun(t, "app", 0, `last=; while :; do m=$(md5sum < /certs/svid.pem); if [ "$m" != "$last" ]; then `+printCert+`last=$m; fi; sleep 0.5; done`)
}

// checkRotation waits until the watcher has printed a second certificate,
// and checks that every one is for its identity.
func checkRotation(t *testing.T, c *container) {
	id := workloadID("rotate", "default")
	deadline := time.Now().Add(3 * rotationTTL)
	for {
		cs := certs(t, c.logs(t))
		if len(cs) >= 2 {
			for i, cert := range cs {
				got, err := x509svid.IDFromCert(cert)
				if err != nil || got.String() != id {
					t.Errorf("certificate %d is for %v (%v), want %s", i, got, err, id)
				}
			}
			if cs[0].SerialNumber.Cmp(cs[1].SerialNumber) == 0 {
				t.Errorf("the second certificate is the first")
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no rotation within %s; the container printed %d certificate(s); refresher log:\n%s", 3*rotationTTL, len(cs), tail(c.pod.rt.node.refLog, 30))
		}
		time.Sleep(time.Second)
	}
}
