package refresh

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/metrics"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

func TestRotationRewritesFiles(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	p := n.workloadProcess()
	id := n.deliver(p.Process.Pid)
	n.startServing()

	before := n.cert(id)
	n.agent.Rotate()
	testhelp.Eventually(t, 5*time.Second, "certificate rotated", func() bool { return !bytes.Equal(n.cert(id), before) })
	fs, err := files.Read(n.store.DeliveryDir(id, 0), "svid.pem", "svid_key.pem")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := x509svid.Parse(fs["svid.pem"], fs["svid_key.pem"]); err != nil {
		t.Fatalf("rotated files do not form an SVID: %v", err)
	}
	key, _ := os.Stat(filepath.Join(n.store.DeliveryDir(id, 0), "svid_key.pem"))
	if key.Mode().Perm() != 0o600 {
		t.Errorf("rotated key mode %o", key.Mode().Perm())
	}
}

// TestReadersNeverSeeMismatch: a reader that resolves one generation (as the
// README says) sees 0 mismatched, partial or missing files across many fast
// rotations; a naive reader opening the plain names is measured too.
func TestReadersNeverSeeMismatch(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	p := n.workloadProcess()
	id := n.deliver(p.Process.Pid)
	var rotations atomic.Int64
	n.startServing()
	dir := n.store.DeliveryDir(id, 0)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var safeReads, safeBad, naiveReads, naiveBad atomic.Int64
	for range 2 {
		readUntil(&wg, stop, func() {
			fs, err := files.Read(dir, "svid.pem", "svid_key.pem", "svid_bundle.pem")
			safeReads.Add(1)
			if err != nil || len(fs["svid_bundle.pem"]) == 0 {
				safeBad.Add(1)
				return
			}
			if _, err := x509svid.Parse(fs["svid.pem"], fs["svid_key.pem"]); err != nil {
				safeBad.Add(1)
			}
		})
		readUntil(&wg, stop, func() {
			naiveReads.Add(1)
			if !naiveTwoFileRead(dir) {
				naiveBad.Add(1)
			}
		})
	}
	last := n.cert(id)
	for rotations.Load() < 200 {
		n.agent.Rotate()
		testhelp.Eventually(t, 5*time.Second, "rotation written", func() bool { return !bytes.Equal(n.cert(id), last) })
		last = n.cert(id)
		rotations.Add(1)
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("%d rotations; safe reader: %d reads, %d bad; naive reader: %d reads, %d mismatched (%.2f%%)",
		rotations.Load(), safeReads.Load(), safeBad.Load(), naiveReads.Load(), naiveBad.Load(), 100*float64(naiveBad.Load())/float64(max(naiveReads.Load(), 1)))
	if safeBad.Load() != 0 {
		t.Errorf("the safe reader saw %d mismatched, partial or missing sets", safeBad.Load())
	}
	if safeReads.Load() < 1000 {
		t.Errorf("only %d safe reads: the loop did not exercise the rotations", safeReads.Load())
	}
}

// TestExitForgetsContainer: when the process exits, its state, stream and
// goroutines are gone within a second.
func TestExitForgetsContainer(t *testing.T) {
	// Not parallel: it counts the goroutines and descriptors of the whole
	// test process. go test starts the parallel tests only once the
	// serial ones are done, so the counts are this test's alone.
	n := newNode(t)
	baseline := runtime.NumGoroutine()
	p1, p2 := n.workloadProcess(), n.workloadProcess()
	id1, id2 := n.deliver(p1.Process.Pid), n.deliver(p2.Process.Pid)
	r, stop := n.start()
	testhelp.Eventually(t, 5*time.Second, "both served with streams open", func() bool { return r.Count() == 2 && n.agent.SVIDStreams() == 2 })
	during := runtime.NumGoroutine()

	p1.Process.Kill()
	p1.Wait()
	start := time.Now()
	testhelp.Eventually(t, time.Second, "exited container forgotten", func() bool {
		_, err := os.Stat(n.store.ContainerDir(id1))
		_, err2 := os.Stat(n.store.RecordPath(id1))
		return os.IsNotExist(err) && os.IsNotExist(err2) && r.Count() == 1 && n.agent.SVIDStreams() == 1
	})
	t.Logf("forgotten %s after exit; goroutines baseline %d, with 2 containers %d", time.Since(start), baseline, during)
	if _, err := os.Stat(n.store.ContainerDir(id2)); err != nil {
		t.Errorf("the live container lost its state: %v", err)
	}
	p2.Process.Kill()
	p2.Wait()
	testhelp.Eventually(t, time.Second, "second container forgotten", func() bool { return r.Count() == 0 && n.agent.SVIDStreams() == 0 })
	stop()
	testhelp.Eventually(t, 2*time.Second, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= baseline+2 })
	if got := n.agent.BundleStreams(); got != 0 {
		t.Errorf("%d bundle streams still open after stop", got)
	}
}

// TestPoststopForgets: the hook's poststop removes the record; the
// refresher closes the stream.
func TestPoststopForgets(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	p := n.workloadProcess()
	id := n.deliver(p.Process.Pid)
	r, _ := n.start()
	testhelp.Eventually(t, 5*time.Second, "served", func() bool { return n.agent.SVIDStreams() == 1 })
	if err := n.store.Remove(id); err != nil {
		t.Fatal(err)
	}
	testhelp.Eventually(t, time.Second, "stream closed after poststop", func() bool { return r.Count() == 0 && n.agent.SVIDStreams() == 0 })
}

// TestAgentRestart: while the agent is away the files stay; when it is back
// rotation resumes promptly; the outage is logged once, not per retry.
func TestAgentRestart(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	var ids []string
	for range 5 {
		ids = append(ids, n.deliver(n.workloadProcess().Process.Pid))
	}
	// The fake agent mints a new SVID per stream: wait until that first
	// rotation is on disk before taking the reference.
	r, before := n.startSettled(ids)
	unavailable := func() float64 {
		return testutil.ToFloat64(r.Metrics.StreamErrors.WithLabelValues(metrics.KindUnavailable))
	}
	failed := unavailable()
	n.agent.Stop()
	// Retries reach the backoff cap (50 ms doubling to 500 ms: the fifth
	// failure) and go on: wait for six failed attempts per container.
	testhelp.Eventually(t, 30*time.Second, "six failed reconnects per container", func() bool {
		return unavailable() >= failed+float64(6*len(ids))
	})
	for _, id := range ids {
		if !bytes.Equal(n.cert(id), before[id]) {
			t.Errorf("%s: files changed while the agent was away", id)
		}
	}
	if err := n.agent.Serve(n.socket); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	// A restarted agent mints new SVIDs.
	testhelp.Eventually(t, 10*time.Second, "rotation resumed for every container", func() bool {
		for _, id := range ids {
			if bytes.Equal(n.cert(id), before[id]) {
				return false
			}
		}
		return true
	})
	t.Logf("all %d containers rotated %s after the agent returned", len(ids), time.Since(back))
	logs := n.checkOutageLoggedOnce()
	if c := strings.Count(logs, "container stream"); c != 0 {
		t.Errorf("containers logged the agent's outage themselves:\n%s", logs)
	}
}

// TestRefresherRestart: a new refresher resumes every live container and
// removes the state of one that exited while it was down.
func TestRefresherRestart(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	live, dead := n.workloadProcess(), n.workloadProcess()
	liveID, deadID := n.deliver(live.Process.Pid), n.deliver(dead.Process.Pid)
	_, stop := n.start()
	testhelp.Eventually(t, 5*time.Second, "served", func() bool { return n.agent.SVIDStreams() == 2 })
	stop()
	dead.Process.Kill()
	dead.Wait()

	r, _ := n.start()
	if _, err := os.Stat(n.store.ContainerDir(deadID)); !os.IsNotExist(err) {
		t.Errorf("state of the container that exited meanwhile is still there (%v)", err)
	}
	if r.Count() != 1 {
		t.Fatalf("serving %d containers, want 1", r.Count())
	}
	before := n.cert(liveID)
	n.agent.Rotate()
	testhelp.Eventually(t, 5*time.Second, "live container rotates after restart", func() bool { return !bytes.Equal(n.cert(liveID), before) })
}

// TestPIDReuse: a record whose pid now belongs to another process (start
// time differs) is never served: its state is removed.
func TestPIDReuse(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	p := n.workloadProcess()
	id := n.deliver(p.Process.Pid)
	rec, err := n.store.Load(id)
	if err != nil {
		t.Fatal(err)
	}
	rec.StartTime-- // the recorded process is not the one with this pid now
	if err := n.store.Save(rec); err != nil {
		t.Fatal(err)
	}
	r, _ := n.start()
	if r.Count() != 0 || n.agent.SVIDStreams() != 0 {
		t.Errorf("served a reused pid: %d containers, %d streams", r.Count(), n.agent.SVIDStreams())
	}
	if _, err := os.Stat(n.store.ContainerDir(id)); !os.IsNotExist(err) {
		t.Errorf("state of the reused pid's record is still there")
	}
}

// TestIdentityChange: when the agent later returns a different SPIFFE ID
// for a container (an attestor that sees the pid differently after exec),
// the refresher writes the new one and logs both IDs once.
func TestIdentityChange(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	passes := &writePasses{}
	p := n.workloadProcess()
	id := n.deliver(p.Process.Pid)
	r, _ := n.start(passes.watch)
	testhelp.Eventually(t, 5*time.Second, "served", func() bool { return r.Count() == 1 })
	other := spiffeid.RequireFromString("spiffe://example.org/after-exec")
	n.agent.Set(p.Process.Pid, other)
	testhelp.Eventually(t, 5*time.Second, "new identity written", func() bool {
		fs, err := files.Read(n.store.DeliveryDir(id, 0), "svid.pem", "svid_key.pem")
		if err != nil {
			return false
		}
		svid, err := x509svid.Parse(fs["svid.pem"], fs["svid_key.pem"])
		return err == nil && svid.ID == other
	})
	// Two rotations after the change, each written: neither may log the
	// change again.
	for range 2 {
		passes.rotate(t, n)
	}
	logs := n.logs.String()
	line := "container identity changed"
	if c := strings.Count(logs, line); c != 1 {
		t.Fatalf("identity change logged %d times, want once:\n%s", c, logs)
	}
	if !strings.Contains(logs, "was="+workload.String()) || !strings.Contains(logs, "now="+other.String()) {
		t.Errorf("the log line does not name both IDs:\n%s", logs)
	}
}
