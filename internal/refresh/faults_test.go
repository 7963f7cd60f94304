package refresh

// Fault injection against the fake agent with many containers: an agent
// that accepts streams and never answers, a state directory that is full,
// and a churn of containers that must leave no goroutine, descriptor,
// stream or directory behind.

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const manyContainers = 50

// deliverMany starts n workload processes and delivers to each.
func (n *node) deliverMany(count int) (ids []string, procs []*os.Process) {
	n.t.Helper()
	for range count {
		p := n.workloadProcess()
		ids = append(ids, n.deliver(p.Process.Pid))
		procs = append(procs, p.Process)
	}
	return ids, procs
}

// validCert reads id's delivery the safe way (one generation) and returns
// its certificate; it fails the test unless cert and key form an SVID.
func (n *node) validCert(id string) []byte {
	n.t.Helper()
	fs, err := files.Read(n.store.DeliveryDir(id, 0), "svid.pem", "svid_key.pem", "svid_bundle.pem")
	if err != nil {
		n.t.Fatalf("%s: reading the delivery: %v", id, err)
	}
	if _, err := x509svid.Parse(fs["svid.pem"], fs["svid_key.pem"]); err != nil {
		n.t.Fatalf("%s: cert and key do not form an SVID: %v", id, err)
	}
	if len(fs["svid_bundle.pem"]) == 0 {
		n.t.Fatalf("%s: empty bundle", id)
	}
	return fs["svid.pem"]
}

// startSettled starts the refresher and waits until it serves every
// container in ids and has written its first update to each (the fake
// agent mints a new SVID for every stream, so the refresher's first write
// replaces the hook's). It returns the certificates then on disk.
func (n *node) startSettled(ids []string) (*Refresher, map[string][]byte) {
	n.t.Helper()
	delivered := map[string][]byte{}
	for _, id := range ids {
		delivered[id] = n.validCert(id)
	}
	r, _ := n.start()
	testhelp.Eventually(n.t, 10*time.Second, "every container served and rewritten once", func() bool {
		return r.Count() == len(ids) && n.agent.SVIDStreams() == int64(len(ids)) && n.allRewritten(ids, delivered)
	})
	now := map[string][]byte{}
	for _, id := range ids {
		now[id] = n.validCert(id)
	}
	return r, now
}

// allRewritten reports whether every container in ids has a certificate
// on disk other than the one in old; one that cannot be read yet has not.
func (n *node) allRewritten(ids []string, old map[string][]byte) bool {
	for _, id := range ids {
		fs, err := files.Read(n.store.DeliveryDir(id, 0), "svid.pem")
		if err != nil || bytes.Equal(fs["svid.pem"], old[id]) {
			return false
		}
	}
	return true
}

func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries) - 1 // the directory's own descriptor
}

func countDir(t *testing.T, dir string) int {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// TestFaultAgentHang: the agent restarts into a state where it accepts
// every stream and never sends. The refresher must neither spin nor pile up
// goroutines or descriptors while it waits, containers keep valid files,
// and everything rotates once the agent answers again.
func TestFaultAgentHang(t *testing.T) {
	// Not parallel: it counts the goroutines and descriptors of the whole
	// test process. go test starts the parallel tests only once the
	// serial ones are done, so the counts are this test's alone.
	n := newNode(t)
	ids, _ := n.deliverMany(manyContainers)
	_, before := n.startSettled(ids)
	healthyG, healthyFD := runtime.NumGoroutine(), openFDs(t)

	n.agent.Configure(func(a *fakeagent.Agent) { a.Hang = true })
	n.agent.Stop()
	if err := n.agent.Serve(n.socket); err != nil {
		t.Fatal(err)
	}
	// Every stream comes back and hangs in the agent.
	testhelp.Eventually(t, 10*time.Second, "every stream reopened into the hanging agent", func() bool {
		return n.agent.SVIDStreams() == manyContainers && n.agent.BundleStreams() == 1
	})
	var gs, fds []int
	for range 8 { // 4 s: eight times the backoff cap
		time.Sleep(500 * time.Millisecond)
		gs, fds = append(gs, runtime.NumGoroutine()), append(fds, openFDs(t))
		if s := n.agent.SVIDStreams(); s != manyContainers {
			t.Errorf("%d SVID streams open while hung, want %d (a stream given up on or opened twice)", s, manyContainers)
		}
	}
	t.Logf("healthy: %d goroutines, %d fds; hung: goroutines %v, fds %v", healthyG, healthyFD, gs, fds)
	// The hung state costs what the healthy one does, and does not grow.
	const slack = 20
	for i := range gs {
		if gs[i] > healthyG+slack || fds[i] > healthyFD+slack {
			t.Errorf("sample %d while hung: %d goroutines, %d fds; healthy was %d, %d (bound +%d)", i, gs[i], fds[i], healthyG, healthyFD, slack)
		}
	}
	if gs[len(gs)-1] > gs[0]+2 || fds[len(fds)-1] > fds[0]+2 {
		t.Errorf("growth while hung: goroutines %v, fds %v", gs, fds)
	}
	for _, id := range ids {
		if !bytes.Equal(n.validCert(id), before[id]) {
			t.Errorf("%s: files changed while the agent hung", id)
		}
	}

	n.agent.Configure(func(a *fakeagent.Agent) { a.Hang = false })
	n.agent.Stop()
	if err := n.agent.Serve(n.socket); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	testhelp.Eventually(t, 15*time.Second, "every container rotated after the agent answered again", func() bool { return n.allRewritten(ids, before) })
	t.Logf("all %d containers rotated %s after the agent answered", manyContainers, time.Since(back).Round(time.Millisecond))
	for _, id := range ids {
		n.validCert(id)
	}
	testhelp.Eventually(t, 5*time.Second, "goroutines and fds back to the healthy level", func() bool {
		return runtime.NumGoroutine() <= healthyG+5 && openFDs(t) <= healthyFD+2
	})
	logs := n.checkOutageLoggedOnce()
	if c := strings.Count(logs, "container stream"); c != 0 {
		t.Errorf("containers logged %d stream errors of their own:\n%s", c, logs)
	}
}

// fillUp leaves no free byte on the tmpfs at dir: it shrinks the mount to
// a little above what is used and fills the rest with one file, which it
// returns.
func fillUp(t *testing.T, dir string) string {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	used := (st.Blocks - st.Bfree) * uint64(st.Bsize)
	size := used + 1<<20
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_REMOUNT, fmt.Sprintf("size=%d", size)); err != nil {
		t.Fatalf("shrinking the state tmpfs: %v", err)
	}
	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, unix.ENOSPC) {
				t.Fatalf("filling the state tmpfs: %v", err)
			}
			break
		}
	}
	// A new file of one page must not fit either.
	if err := os.WriteFile(filepath.Join(dir, "probe"), chunk, 0o600); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("state tmpfs is not full: writing a page gave %v", err)
	}
	os.Remove(filepath.Join(dir, "probe"))
	return filler
}

// writeErrors counts the refresher's logged write failures per container.
var writeErrLine = regexp.MustCompile(`msg="container files" container=(\S+) .*error="writing `)

func writeErrors(logs string) map[string]int {
	m := map[string]int{}
	for _, line := range strings.Split(logs, "\n") {
		if g := writeErrLine.FindStringSubmatch(line); g != nil {
			m[g[1]]++
		}
	}
	return m
}

// TestFaultStateDirFull: rotations that hit ENOSPC keep the current files
// whole and readable, are logged once per container however many rotations
// fail, and the first rotation after space is freed rewrites everything.
func TestFaultStateDirFull(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	ids, _ := n.deliverMany(manyContainers)
	_, before := n.startSettled(ids)

	// Readers read every container the safe way throughout.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads, bad atomic.Int64
	var firstBad atomic.Value
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := ids[i%len(ids)]
				fs, err := files.Read(n.store.DeliveryDir(id, 0), "svid.pem", "svid_key.pem", "svid_bundle.pem")
				reads.Add(1)
				if err == nil {
					_, err = x509svid.Parse(fs["svid.pem"], fs["svid_key.pem"])
				}
				if err == nil && len(fs["svid_bundle.pem"]) == 0 {
					err = errors.New("empty bundle")
				}
				if err != nil {
					bad.Add(1)
					firstBad.CompareAndSwap(nil, fmt.Sprintf("%s: %v", id, err))
				}
			}
		}()
	}

	filler := fillUp(t, n.cfg.StateDir)
	const fullRotations = 3
	for i := range fullRotations {
		n.agent.Rotate()
		// Every container has failed to write this rotation once its
		// stream has delivered it; the fake agent sends on Rotate at once.
		testhelp.Eventually(t, 10*time.Second, "every container tried (and failed) to write", func() bool {
			return len(writeErrors(n.logs.String())) == manyContainers
		})
		// Give every container time to handle rotation i (the fake agent
		// sends at once; a write attempt takes well under a millisecond).
		time.Sleep(500 * time.Millisecond)
		t.Logf("rotation %d while full: %d write errors logged", i+1, sum(writeErrors(n.logs.String())))
	}
	for _, id := range ids {
		if !bytes.Equal(n.validCert(id), before[id]) {
			t.Errorf("%s: certificate changed although every write failed", id)
		}
		checkNoDebris(t, n.store.DeliveryDir(id, 0))
	}
	logs := n.logs.String()
	if m := regexp.MustCompile(`error="writing [^"]*no space left on device`).FindString(logs); m == "" {
		t.Errorf("no write error names ENOSPC:\n%s", firstLines(logs, 5))
	}
	t.Run("write failure logged once per container", func(t *testing.T) {
		perContainer := writeErrors(logs)
		var wrong []string
		for _, id := range ids {
			if perContainer[id] != 1 {
				wrong = append(wrong, fmt.Sprintf("%s:%d", id, perContainer[id]))
			}
		}
		if len(wrong) > 0 {
			t.Errorf("over %d failed rotations, %d of %d containers logged their write failure other than once (container:times) %v; %d lines in all, e.g.\n%s",
				fullRotations, len(wrong), len(ids), wrong[:min(5, len(wrong))], sum(perContainer), grepLines(logs, ids[0], 6))
		}
	})

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	n.agent.Rotate()
	testhelp.Eventually(t, 10*time.Second, "every container rewritten after space was freed", func() bool { return n.allRewritten(ids, before) })
	t.Logf("all %d rewritten %s after space was freed", manyContainers, time.Since(freed).Round(time.Millisecond))
	close(stop)
	wg.Wait()
	for _, id := range ids {
		n.validCert(id)
		checkNoDebris(t, n.store.DeliveryDir(id, 0))
	}
	t.Logf("readers: %d reads, %d bad", reads.Load(), bad.Load())
	if bad.Load() != 0 {
		t.Errorf("readers saw %d missing or mismatched sets; first: %v", bad.Load(), firstBad.Load())
	}
	if reads.Load() < 1000 {
		t.Errorf("only %d reads: the readers did not overlap the faults", reads.Load())
	}
}

func grepLines(s, sub string, k int) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) && len(out) < k {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func sum(m map[string]int) int {
	s := 0
	for _, v := range m {
		s += v
	}
	return s
}

func firstLines(s string, k int) string {
	lines := strings.SplitN(s, "\n", k+1)
	return strings.Join(lines[:min(k, len(lines))], "\n")
}

// checkNoDebris: a failed write leaves no partial generation or temporary
// link: at most the current and previous generations remain.
func checkNoDebris(t *testing.T, dir string) {
	t.Helper()
	// While the disk is full the refresher retries its write with backoff,
	// so a snapshot can catch an attempt in flight, before it removes its
	// own failed generation. Debris that a failed write leaves behind stays;
	// wait (boundedly) for a snapshot with none.
	var problems []string
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if problems = debris(t, dir); len(problems) == 0 || time.Now().After(deadline) {
			break
		}
	}
	for _, p := range problems {
		t.Error(p)
	}
}

// debris lists what a delivery directory holds beyond the current and the
// previous generation and the user-visible links.
func debris(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	cur, err := os.Readlink(filepath.Join(dir, files.DataLink))
	if err != nil {
		t.Fatal(err)
	}
	var problems []string
	gens := 0
	for _, e := range entries {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, "..tmp."):
			problems = append(problems, fmt.Sprintf("%s: temporary link %s left behind", dir, name))
		case e.IsDir() && strings.HasPrefix(name, ".."):
			gens++
			if name != cur {
				continue
			}
			inner, _ := os.ReadDir(filepath.Join(dir, name))
			// The three files and the own trust domain's bundle.
			if len(inner) != 4 {
				problems = append(problems, fmt.Sprintf("%s: current generation holds %d files", dir, len(inner)))
			}
		}
	}
	if gens > 2 {
		problems = append(problems, fmt.Sprintf("%s: %d generations (a failed write left one behind)", dir, gens))
	}
	return problems
}

// TestFaultChurnLeaks: rounds of many containers started, served and
// killed. Once they are forgotten the refresher is back to where it was
// after the first round (goroutines, descriptors, streams, directories),
// and once it stops, back to before it started.
func TestFaultChurnLeaks(t *testing.T) {
	// Not parallel: it counts the goroutines and descriptors of the whole
	// test process. go test starts the parallel tests only once the
	// serial ones are done, so the counts are this test's alone.
	n := newNode(t)
	const rounds = 3
	startG, startFD := runtime.NumGoroutine(), openFDs(t)
	containersDir := filepath.Join(n.cfg.StateDir, "containers")
	recordsDir := n.store.RecordsDir()
	r, stop := n.start()

	type sample struct{ g, fd int }
	var after []sample
	for round := range rounds {
		var ids []string
		var procs []*os.Process
		for range manyContainers {
			p := n.workloadProcess()
			ids = append(ids, n.deliverWhileServing(p.Process.Pid))
			procs = append(procs, p.Process)
		}
		testhelp.Eventually(t, 10*time.Second, "round's containers served", func() bool {
			return r.Count() == manyContainers && n.agent.SVIDStreams() == manyContainers
		})
		for _, id := range ids {
			n.validCert(id)
		}
		for _, p := range procs {
			p.Kill()
			p.Wait()
		}
		testhelp.Eventually(t, 5*time.Second, "every killed container forgotten", func() bool {
			return r.Count() == 0 && n.agent.SVIDStreams() == 0 && countDir(t, containersDir) == 0 && countDir(t, recordsDir) == 0
		})
		// Closing is asynchronous on both ends of each stream.
		var s sample
		if len(after) == 0 {
			time.Sleep(500 * time.Millisecond)
			s = sample{runtime.NumGoroutine(), openFDs(t)}
		} else {
			base := after[0]
			deadline := time.Now().Add(3 * time.Second)
			for {
				s = sample{runtime.NumGoroutine(), openFDs(t)}
				if (s.g <= base.g+2 && s.fd <= base.fd) || time.Now().After(deadline) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		after = append(after, s)
		t.Logf("round %d: after churn %d goroutines, %d fds", round+1, s.g, s.fd)
	}
	base := after[0]
	for i, s := range after[1:] {
		if s.g > base.g+2 || s.fd > base.fd {
			t.Errorf("round %d leaked: %d goroutines, %d fds after churn; round 1 left %d, %d", i+2, s.g, s.fd, base.g, base.fd)
		}
	}
	if b := n.agent.BundleStreams(); b != 1 {
		t.Errorf("%d bundle streams while running, want 1", b)
	}
	stop()
	testhelp.Eventually(t, 3*time.Second, "back to before the refresher started", func() bool {
		return runtime.NumGoroutine() <= startG+2 && openFDs(t) <= startFD && n.agent.BundleStreams() == 0 && n.agent.SVIDStreams() == 0
	})
	t.Logf("before start %d goroutines, %d fds; after stop %d, %d", startG, startFD, runtime.NumGoroutine(), openFDs(t))
}

// TestFaultStateDirFullRetry: a rotation whose write failed is retried
// once space is free, without waiting for the agent's next update. With a
// real agent that update comes at half the new SVID's lifetime, after the
// files on disk (written at half the old one's) have expired.
func TestFaultStateDirFullRetry(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	ids, _ := n.deliverMany(5)
	_, before := n.startSettled(ids)
	filler := fillUp(t, n.cfg.StateDir)
	n.agent.Rotate()
	testhelp.Eventually(t, 10*time.Second, "every container failed to write the rotation", func() bool {
		return len(writeErrors(n.logs.String())) == len(ids)
	})
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	// Generous: several backoff caps and rescan intervals.
	wait := 4*n.cfg.Refresher.BackoffMax + 2*n.cfg.Refresher.RescanInterval
	deadline := time.Now().Add(wait)
	for {
		pending := 0
		for _, id := range ids {
			if bytes.Equal(n.validCert(id), before[id]) {
				pending++
			}
		}
		if pending == 0 {
			t.Logf("failed rotation retried %s after space was freed", time.Since(freed).Round(time.Millisecond))
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d containers still hold the pre-rotation files %s after space was freed: a failed write is retried only on the agent's next update", pending, len(ids), wait)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestFaultAttestationFailed: from SPIRE 1.15.2 the agent answers a pid
// it could not attest with Unavailable "workload attestation failed". The
// refresher logs that once for the container, not as the agent being
// down, keeps the files, and retries with backoff until it succeeds.
func TestFaultAttestationFailed(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	id := n.deliver(n.workloadProcess().Process.Pid)
	before := n.validCert(id)
	n.agent.Configure(func(a *fakeagent.Agent) {
		a.RefuseSVIDs = status.Error(codes.Unavailable, "workload attestation failed")
	})
	calls := n.agent.SVIDCalls()
	n.start()
	testhelp.Eventually(t, 10*time.Second, "the stream retried", func() bool { return n.agent.SVIDCalls() >= calls+3 })
	if !bytes.Equal(n.validCert(id), before) {
		t.Fatal("files changed while the agent could not attest the pid")
	}
	n.agent.Configure(func(a *fakeagent.Agent) { a.RefuseSVIDs = nil })
	testhelp.Eventually(t, 10*time.Second, "rotation after attestation works again", func() bool {
		return !bytes.Equal(n.validCert(id), before)
	})
	logs := n.logs.String()
	if c := strings.Count(logs, "could not attest pid"); c != 1 {
		t.Errorf("attestation failure logged %d times, want once:\n%s", c, logs)
	}
	if strings.Contains(logs, "agent unreachable") {
		t.Errorf("a failed attestation was logged as the agent being unreachable:\n%s", logs)
	}
	if c := strings.Count(logs, "container stream healthy again"); c != 1 {
		t.Errorf("recovery logged %d times, want once:\n%s", c, logs)
	}
}
