package refresh

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/metrics"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// gaugeValue gathers r's registry and returns metric name's value.
func gaugeValue(t *testing.T, r *Refresher, name string) (float64, bool) {
	t.Helper()
	fams, err := r.Metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name && len(f.GetMetric()) > 0 {
			return f.GetMetric()[0].GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// TestReportAndMetrics, against the fake agent: the report and the gauges
// read from it follow a container from start through rotation and agent
// outage; the counters count in the code paths that write and stream.
func TestReportAndMetrics(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	r, _ := n.start()
	if _, ok := gaugeValue(t, r, "spiffe_oci_svid_earliest_expiry_timestamp_seconds"); ok {
		t.Error("an earliest expiry with no container served")
	}
	testhelp.Eventually(t, 5*time.Second, "ready with no container", func() bool { ok, _ := r.Report().Ready(); return ok })

	id := n.deliverWhileServing(n.workloadProcess().Process.Pid)
	testhelp.Eventually(t, 5*time.Second, "stream open", func() bool {
		rep := r.Report()
		return len(rep.Containers) == 1 && rep.Containers[0].StreamOpen
	})
	rotations := testutil.ToFloat64(r.Metrics.Rotations)
	n.agent.Rotate()
	testhelp.Eventually(t, 5*time.Second, "rotation counted", func() bool { return testutil.ToFloat64(r.Metrics.Rotations) > rotations })

	leaf := func() *x509.Certificate {
		b, _ := pem.Decode(n.cert(id))
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := r.Report().Containers[0]
	if c.ID != id || c.SPIFFEIDs[0] != workload.String() || c.Error != "" || time.Since(c.LastRotation) > 10*time.Second {
		t.Errorf("report line %+v", c)
	}
	if want := leaf().NotAfter; !c.NotAfter.Equal(want) {
		t.Errorf("report not-after %s, the certificate on disk %s", c.NotAfter, want)
	}
	if v, _ := gaugeValue(t, r, "spiffe_oci_svid_earliest_expiry_timestamp_seconds"); v != float64(leaf().NotAfter.Unix()) {
		t.Errorf("earliest expiry %v, want %d", v, leaf().NotAfter.Unix())
	}
	if disk := status.FromDisk(n.store, mustLoad(t, n, id)); !disk.NotAfter.Equal(c.NotAfter) || disk.LastRotation.IsZero() {
		t.Errorf("FromDisk %+v disagrees with the refresher's %+v", disk, c)
	}

	n.agent.Stop()
	testhelp.Eventually(t, 5*time.Second, "not ready while the agent is down", func() bool {
		ok, why := r.Report().Ready()
		return !ok && why == "agent unreachable: "+n.socket
	})
	if v, _ := gaugeValue(t, r, "spiffe_oci_ready"); v != 0 {
		t.Errorf("spiffe_oci_ready = %v with the agent down", v)
	}
	if testutil.ToFloat64(r.Metrics.StreamErrors.WithLabelValues(metrics.KindUnavailable)) == 0 {
		t.Error("no unavailable stream error counted with the agent down")
	}
	if err := n.agent.Serve(n.socket); err != nil {
		t.Fatal(err)
	}
	testhelp.Eventually(t, 10*time.Second, "ready after the agent's return", func() bool { ok, _ := r.Report().Ready(); return ok })
}

func mustLoad(t *testing.T, n *node, id string) statedir.Record {
	t.Helper()
	rec, err := n.store.Load(id)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// TestReload: settings apply without touching streams; a setting that
// needs a restart refuses the whole configuration.
func TestReload(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	scans, counting := countScans()
	r, _ := n.start(counting)
	n.deliverWhileServing(n.workloadProcess().Process.Pid)
	testhelp.Eventually(t, 5*time.Second, "stream open", func() bool {
		rep := r.Report()
		return len(rep.Containers) == 1 && rep.Containers[0].StreamOpen
	})
	opened := testutil.ToFloat64(r.Metrics.StreamsOpened)

	next := n.cfg
	next.Refresher.BackoffMax = 7 * time.Second
	next.Refresher.RescanInterval = 50 * time.Millisecond
	if err := r.Reload(next); err != nil {
		t.Fatal(err)
	}
	if got := r.settings().BackoffMax; got != 7*time.Second {
		t.Errorf("backoff_max after reload %s", got)
	}
	bad := next
	bad.StateDir = "/run/elsewhere"
	bad.Refresher.BackoffMax = time.Hour
	if err := r.Reload(bad); err == nil {
		t.Error("a new state_dir was taken live")
	}
	if got := r.settings().BackoffMax; got != 7*time.Second {
		t.Errorf("a refused reload changed backoff_max to %s", got)
	}
	// Several rescans at the new interval, each of which would reopen a
	// stream that a reload had broken.
	after := scans.Load()
	testhelp.Eventually(t, 10*time.Second, "three rescans after the reloads", func() bool { return scans.Load() >= after+3 })
	if got := testutil.ToFloat64(r.Metrics.StreamsOpened); got != opened {
		t.Errorf("streams opened %v -> %v across reloads", opened, got)
	}
}

// TestServer: the unix socket is 0600 and serves /status; the TCP address
// serves metrics and probes but not /status; a second server on the same
// socket is refused.
func TestServer(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	r, _ := n.start()
	socket := filepath.Join(n.dir, "m.sock")
	log := slog.New(slog.NewTextHandler(n.logs, nil))
	srv, err := status.Listen(socket, "127.0.0.1:0", r.Metrics.Handler(), r.Report, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	if st, err := os.Stat(socket); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode: %v %v", st, err)
	}
	cl := status.NewClient(socket)
	testhelp.Eventually(t, 5*time.Second, "readyz 200", func() bool {
		code, _, err := cl.Get(context.Background(), status.PathReadyz)
		return err == nil && code == http.StatusOK
	})
	if _, err := cl.Report(context.Background()); err != nil {
		t.Errorf("/status on the unix socket: %v", err)
	}
	tcp := "http://" + srv.Addrs()[1].String()
	for path, want := range map[string]int{status.PathMetrics: 200, status.PathHealthz: 200, status.PathReadyz: 200, status.PathStatus: 404} {
		resp, err := http.Get(tcp + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("TCP %s: HTTP %d, want %d", path, resp.StatusCode, want)
		}
	}
	if _, err := status.Listen(socket, "", r.Metrics.Handler(), r.Report, log); err == nil {
		t.Error("a second server took over a socket in use")
	}
}

// TestDeliveryErrorStaysReported: a delivery the refresher cannot render
// (its spiffe_id is no longer among the agent's SVIDs) stays in the report
// and is logged once, not followed at once by a false "written again".
func TestDeliveryErrorStaysReported(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	passes := &writePasses{}
	p := n.workloadProcess()
	pinned := classic
	pinned.SPIFFEID = workload.String()
	id := n.deliverDelivery(p.Process.Pid, true, pinned)
	hooks := n.cert(id)
	r, _ := n.start(passes.watch)
	// The fake agent mints a new SVID per stream: the refresher's first
	// write replaces the hook's. Take the reference after it.
	testhelp.Eventually(t, 5*time.Second, "served and rewritten once", func() bool { return r.Count() == 1 && !bytes.Equal(n.cert(id), hooks) })
	before := n.cert(id)
	n.agent.Set(p.Process.Pid, spiffeid.RequireFromString("spiffe://example.org/other"))
	testhelp.Eventually(t, 5*time.Second, "the delivery's trouble logged", func() bool {
		return strings.Contains(n.logs.String(), "container files")
	})
	// Wait for a write pass over the rotated SVIDs: the one that would
	// log "written again" if the trouble were cleared wrongly.
	passes.rotate(t, n)
	if c := r.Report().Containers[0]; !strings.Contains(c.Error, workload.String()) {
		t.Errorf("report error %q, want the missing %s", c.Error, workload)
	}
	logs := n.logs.String()
	if strings.Contains(logs, "container files written again") {
		t.Errorf("a delivery that was not written was logged as written again:\n%s", logs)
	}
	if c := strings.Count(logs, `msg="container files"`); c != 1 {
		t.Errorf("the delivery's trouble logged %d times, want once:\n%s", c, logs)
	}
	if !bytes.Equal(n.cert(id), before) {
		t.Error("the files changed")
	}
}

// countScans returns a count of a refresher's scans and the option of
// node.start that makes the refresher keep it.
func countScans() (*atomic.Int64, func(*Refresher)) {
	var n atomic.Int64
	return &n, func(r *Refresher) { r.hooks.scanned = func() { n.Add(1) } }
}

// writePasses records the serial number of the leaf certificate each of
// the refresher's write passes worked from.
type writePasses struct {
	mu   sync.Mutex
	seen []string
}

// watch is the option of node.start that makes the refresher record its
// passes in w.
func (w *writePasses) watch(r *Refresher) {
	r.hooks.writePass = func(_ string, svids *agent.X509SVIDs) {
		if svids == nil || len(svids.SVIDs) == 0 {
			return
		}
		w.mu.Lock()
		w.seen = append(w.seen, svids.SVIDs[0].Certificates[0].SerialNumber.String())
		w.mu.Unlock()
	}
}

func (w *writePasses) serials() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.seen)
}

// sawOtherThan reports whether a pass worked from a certificate not in old.
func (w *writePasses) sawOtherThan(old []string) bool {
	for _, s := range w.serials() {
		if !slices.Contains(old, s) {
			return true
		}
	}
	return false
}

// rotate rotates n's agent's SVIDs and waits for a write pass over them.
func (w *writePasses) rotate(t *testing.T, n *node) {
	t.Helper()
	seen := w.serials()
	n.agent.Rotate()
	testhelp.Eventually(t, 10*time.Second, "a write pass over the rotated SVIDs", func() bool { return w.sawOtherThan(seen) })
}
