package cri

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/status"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestCRIONodeRun is the node benchmark's run at small scale, so that its
// path stays tested (make bench runs it with 110 pods and measures it):
// 10 pods across 5 namespaces and service accounts under CRI-O, one entry
// each with a short TTL. Every pod starts with its files; one rotation
// reaches all of them; the agent restarts and all of them are served
// again (a new certificate, as the restarted agent mints one); the
// refresher is SIGKILLed and serves all of them again; and every
// pod's files stay valid (readable, matching key and bundle, the right
// identity, within their validity) throughout.
func TestCRIONodeRun(t *testing.T) {
	requireTools(t)
	n := newNode(t, tempDir(t, "node-"))
	r := startCRIO(t, n)
	const ttl = 20 * time.Second
	f := startFleet(t, r, fleetOptions{pods: 10, groups: 5, batch: 5, ttl: ttl})
	first, err := f.snapshot()
	if err != nil {
		t.Fatalf("right after start: %v", err)
	}
	w := f.watch(250 * time.Millisecond)
	defer func() {
		fails := w.stop()
		t.Logf("pod 0's files held %d certificates in all", len(w.seen[0]))
		if len(fails) > 0 {
			t.Errorf("%d checks of the pods' files failed, first ones:\n%s", len(fails), strings.Join(fails[:min(len(fails), 10)], "\n"))
		}
	}()

	// The agent renews an SVID in the second half of its life.
	f.waitAllNew(t, serials(first), ttl+10*time.Second, "rotation")
	rotated, err := f.snapshot()
	if err != nil {
		t.Fatal(err)
	}
	c0, c1 := first[0].cert, rotated[0].cert
	t.Logf("rotation: pod 0 went from a certificate valid %s to %s to one valid %s to %s",
		c0.NotBefore.Format(time.TimeOnly), c0.NotAfter.Format(time.TimeOnly), c1.NotBefore.Format(time.TimeOnly), c1.NotAfter.Format(time.TimeOnly))

	logged, _ := os.ReadFile(n.refLog)
	n.spire.StopAgent(t)
	// Taken with the agent down, so that only the restarted agent can
	// have sent what replaces it.
	before, err := f.snapshot()
	if err != nil {
		t.Fatal(err)
	}
	// Down until every stream has retried past the refresher's 2 s
	// backoff cap (200 ms doubling: the fifth failure): six failed
	// reconnects per pod, as the refresher counts them.
	metricsSocket := filepath.Join(n.stateDir, "refresher.sock")
	failed := streamErrors(t, metricsSocket)
	poll.Eventually(t, 60*time.Second, "six failed reconnects per pod", func() bool {
		return streamErrors(t, metricsSocket) >= failed+float64(6*len(f.members))
	})
	n.spire.StartAgent(t)
	back := time.Now()
	f.waitAllNew(t, serials(before), ttl, "after the agent's restart")
	t.Logf("all %d pods held a new certificate %s after the agent was back", len(f.members), time.Since(back).Round(100*time.Millisecond))
	// (The refresher may have found the agent unreachable once at its
	// start, before its entry reached the agent.)
	if log, _ := os.ReadFile(n.refLog); strings.Count(string(log[len(logged):]), "agent unreachable") != 1 {
		t.Errorf("the outage was not logged exactly once:\n%s", log[len(logged):])
	}

	// The refresher is SIGKILLed and restarted: it serves all of them
	// again (its status report shows every SVID stream answered).
	n.refresher.Process.Signal(syscall.SIGKILL)
	n.refresher.Wait()
	os.Remove(filepath.Join(n.dir, "notify.sock"))
	restart := time.Now()
	n.startRefresher(t, filepath.Join(n.prefix, "bin", "spiffe-oci-refresher"))
	n.waitStreams(t, len(f.members), 30*time.Second)
	t.Logf("all %d pods served again %s after the refresher's restart", len(f.members), time.Since(restart).Round(10*time.Millisecond))
}

// streamErrors reads the refresher's count of failed SVID streams (all
// kinds) from its metrics socket.
func streamErrors(t *testing.T, socket string) float64 {
	return metricSum(t, socket, "spiffe_oci_svid_stream_errors_total")
}

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
