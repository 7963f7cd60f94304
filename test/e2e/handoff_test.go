package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/status"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// metricSum reads the sum of a metric's series from the refresher's
// metrics socket.
func metricSum(t *testing.T, socket, name string) float64 {
	t.Helper()
	code, body, err := status.NewClient(socket).Get(context.Background(), status.PathMetrics)
	if err != nil || code != 200 {
		t.Fatalf("GET %s on %s: HTTP %d, %v", status.PathMetrics, socket, code, err)
	}
	return testhelp.MetricSum(t, body, name)
}

// TestHandoff: with a refresher on the node, the hook hands the container
// over (the refresher counts it), and the container's own process reads
// its SVID, under runc and under Podman; the same annotation with no
// refresher is served by spiffe-oci-hook-direct, which the hook runs.
func TestHandoff(t *testing.T) {
	e := newEnv(t)
	run := func(t *testing.T) { e.runPrinting(t, "/certs", nil) }

	t.Run("no refresher: spiffe-oci-hook-direct", run)

	metrics := filepath.Join(e.dir, "refresher-metrics.sock")
	r := e.startRefresherWith(t, e.writeConfig("refresher:\n  metrics_socket: "+metrics+"\n"))
	t.Run("handed to the refresher", func(t *testing.T) {
		before := metricSum(t, metrics, "spiffe_oci_handoffs_total")
		timed := metricSum(t, metrics, "spiffe_oci_handoff_duration_seconds_count")
		run(t)
		if got := metricSum(t, metrics, "spiffe_oci_handoffs_total"); got != before+1 {
			t.Fatalf("the refresher delivered %v containers handed over, want %v:\n%s", got, before+1, readFile(r.log))
		}
		// Its time is observed once, with the count.
		if got := metricSum(t, metrics, "spiffe_oci_handoff_duration_seconds_count"); got != timed+1 {
			t.Errorf("spiffe_oci_handoff_duration_seconds observed %v deliveries, want %v", got, timed+1)
		}
		if sum := metricSum(t, metrics, "spiffe_oci_handoff_duration_seconds_sum"); sum <= 0 {
			t.Errorf("spiffe_oci_handoff_duration_seconds_sum = %v after a delivery, want the time it took", sum)
		}
	})
	t.Run("Podman, handed to the refresher", func(t *testing.T) {
		rootfs := filepath.Join(shortTempDir(t), "rootfs")
		makeBusyboxRootfs(t, rootfs)
		before := metricSum(t, metrics, "spiffe_oci_handoffs_total")
		out, err := podman(t, podmanStore(t), renderHooksDir(t, e.config), rootfs, "--annotation", annotation+"=- cert_dir: /certs", printSPIFFEID)
		if err != nil {
			t.Fatalf("podman run: %v\n%s", err, out)
		}
		if got := strings.TrimSpace(out); got != workloadID {
			t.Errorf("the container printed %q, want its SPIFFE ID %s", got, workloadID)
		}
		if got := metricSum(t, metrics, "spiffe_oci_handoffs_total"); got != before+1 {
			t.Fatalf("the refresher delivered %v containers handed over, want %v:\n%s", got, before+1, readFile(r.log))
		}
	})
}

// TestRefresherKilledMidHandoff: the refresher is killed while it waits,
// for a handed-over container, for the container's entry to reach the
// agent. The hook finds the connection closed without an answer, removes
// what the refresher may have written, and runs spiffe-oci-hook-direct,
// which waits for the entry itself: the container starts with its
// identity, never without.
func TestRefresherKilledMidHandoff(t *testing.T) {
	e := startEnv(t)
	e.waitSynced() // the delegates' entries, not the workload's
	config := e.writeConfig("registration_wait: 8s\n")
	r := e.startRefresherWith(t, config)

	const certDir = "/certs"
	b := newBundle(t, []string{"/bin/sh", "-c", printFiles(certDir)})
	b.AddAnnotation(annotation, "- cert_dir: "+certDir+"\n")
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(config)}}
	type result struct {
		out, stderr string
		err         error
	}
	done := make(chan result, 1)
	go func() {
		out, stderr, err := b.runc(t)
		done <- result{out, stderr, err}
	}()

	// The hook is connected and the refresher is waiting for the entry:
	// the refresher holds the request.
	testhelp.Eventually(t, 20*time.Second, "the refresher holding the handed-over request", func() bool {
		return handoffConnections(t) > 0
	})
	r.cmd.Process.Kill()
	r.cmd.Wait()

	// Now the entry: spiffe-oci-hook-direct, waiting on its own stream,
	// receives it.
	e.spire.CreateEntry(t, workloadID, []string{"unix:uid:0", "unix:path:" + runcInitPath(t)}, time.Hour)
	res := <-done
	if res.err != nil {
		t.Fatalf("runc run: %v\nstderr: %s", res.err, res.stderr)
	}
	checkSVID(t, section(t, res.out, "cert"), section(t, res.out, "key"), section(t, res.out, "bundle"), workloadID)
}

// runPrinting runs under runc, with the hook and e's configuration, a
// container of uid 1000 annotated for certDir that prints its files, with
// edit applied to its bundle, and checks that it read a valid SVID for
// workloadID with a key only its user reads.
func (e *env) runPrinting(t *testing.T, certDir string, edit func(*bundle)) (*bundle, string) {
	t.Helper()
	b := newBundle(t, []string{"/bin/sh", "-c", printFiles(certDir)})
	b.SetProcessUID(1000)
	b.SetProcessGID(1000)
	b.AddAnnotation(annotation, "- cert_dir: "+certDir+"\n")
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	if edit != nil {
		edit(b)
	}
	out, stderr, err := b.runc(t)
	if err != nil {
		t.Fatalf("runc run: %v\nstderr: %s", err, stderr)
	}
	checkSVID(t, section(t, out, "cert"), section(t, out, "key"), section(t, out, "bundle"), workloadID)
	if got := strings.TrimSpace(section(t, out, "keystat")); got != "600 1000 1000" {
		t.Errorf("key mode/owner inside the container = %q, want \"600 1000 1000\"", got)
	}
	return b, out
}

// handoffConnections counts the connections accepted on handoff sockets.
func handoffConnections(t *testing.T) int {
	t.Helper()
	data, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		t.Fatal(err)
	}
	// Inodes of sockets bound at a path ending in refresher.sock that are
	// connected (state 03, SS_CONNECTED): the accepted end shows the
	// listener's path too.
	n := 0
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 8 && strings.HasSuffix(f[7], "/handoff.sock") && f[5] == "03" {
			n++
		}
	}
	return n
}
