package cri

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// A fleet is a node's worth of pods: each pod in one of several
// namespace/service-account groups, with one entry per group (pod-level
// k8s selectors), and one annotated app container that sleeps. The node
// test (make test, 10 pods) and the node benchmark (make bench, 110 pods)
// both run one.
type fleet struct {
	r       *runtime
	members []*member
	ttl     time.Duration
}

// member is one pod of the fleet and the identity its files must hold.
type member struct {
	pod *pod
	app *container
	id  string // the SPIFFE ID of its namespace and service account
	pid int    // the app's process on the host: its files are read through /proc/pid/root
	// hookTime is crictl create + start of the annotated app container.
	hookTime time.Duration
	sidecars *podStartRig
	certs    string // sidecars: the host directory the helper writes
}

// fleetCertDir is where each app container asks for its files.
const fleetCertDir = "/certs"

// appScript sleeps until it is stopped: as a pid namespace's init, a bare
// sleep would ignore SIGTERM and make every stop wait out its timeout.
const appScript = "trap 'exit 0' TERM; sleep 2147483647 & wait"

// fleetOptions size a fleet.
type fleetOptions struct {
	pods   int           // pods in all
	groups int           // namespace/service-account pairs, one entry each
	batch  int           // pods created at a time
	ttl    time.Duration // X.509 SVID TTL of every entry
	// sidecars, when set, runs each pod without the annotation and with a
	// spiffe-helper daemon sidecar (writing to a host directory) instead.
	sidecars *podStartRig
}

// startFleet registers one entry per group, then runs the pods batch at a
// time, each batch concurrently, as a kubelet starting a node's pods does.
// Every pod's app container must start with its files.
func startFleet(t *testing.T, r *runtime, o fleetOptions) *fleet {
	t.Helper()
	n := r.node
	for g := range o.groups {
		ns, sa := fmt.Sprintf("team-%02d", g), fmt.Sprintf("sa-%02d", g)
		id := workloadID(ns, sa)
		if !n.entries[id] {
			n.spire.CreateEntry(t, id, []string{"k8s:ns:" + ns, "k8s:sa:" + sa}, o.ttl)
			n.entries[id] = true
		}
	}
	n.waitSynced(t)

	f := &fleet{r: r, ttl: o.ttl}
	ann := map[string]string{annotation: "- cert_dir: " + fleetCertDir + "\n"}
	for i := range o.pods {
		g := i % o.groups
		ns, sa := fmt.Sprintf("team-%02d", g), fmt.Sprintf("sa-%02d", g)
		a := ann
		if o.sidecars != nil {
			a = nil
		}
		p := r.newPod(fmt.Sprintf("app-%03d", i), ns, sa, a)
		t.Cleanup(func() { p.remove() })
		f.members = append(f.members, &member{pod: p, id: workloadID(ns, sa), sidecars: o.sidecars})
	}
	// Removed batch at a time too, before each pod's own cleanup (which
	// then has nothing left to do).
	t.Cleanup(func() { f.each(o.batch, func(m *member) error { return m.pod.remove() }) })
	if err := f.each(o.batch, (*member).start); err != nil {
		t.Fatalf("%s: starting %d pods, %d at a time: %v", r.name, o.pods, o.batch, err)
	}
	return f
}

// each runs fn on every member, batch at a time, and joins the errors.
func (f *fleet) each(batch int, fn func(*member) error) error {
	var errs []error
	for start := 0; start < len(f.members); start += batch {
		ms := f.members[start:min(start+batch, len(f.members))]
		es := make([]error, len(ms))
		var wg sync.WaitGroup
		for i, m := range ms {
			wg.Go(func() { es[i] = fn(m) })
		}
		wg.Wait()
		errs = append(errs, es...)
	}
	return errors.Join(errs...)
}

// start runs the member's pod and its annotated app container, and finds
// the app's pid.
func (m *member) start() error {
	if err := m.pod.start(); err != nil {
		return err
	}
	if m.sidecars != nil {
		dir, err := m.sidecars.startHelper(m.pod)
		if err != nil {
			return fmt.Errorf("pod %s/%s: %w", m.pod.ns, m.pod.name, err)
		}
		m.certs = dir
	}
	begin := time.Now()
	c, err := m.pod.createWith("app", 0, appScript)
	if err != nil {
		return fmt.Errorf("pod %s/%s: %w", m.pod.ns, m.pod.name, err)
	}
	if err := c.start(); err != nil {
		return fmt.Errorf("pod %s/%s: %w", m.pod.ns, m.pod.name, err)
	}
	m.hookTime = time.Since(begin)
	m.app = c
	out, err := m.pod.rt.run("inspect", "-o", "json", c.id)
	if err != nil {
		return err
	}
	var st struct {
		Info struct {
			PID int `json:"pid"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Info.PID == 0 {
		return fmt.Errorf("pod %s/%s: no pid in crictl inspect (%v)", m.pod.ns, m.pod.name, err)
	}
	m.pid = st.Info.PID
	return nil
}

// files is what a member's app sees in its certificate directory.
type files struct {
	cert *x509.Certificate
	gen  string // the generation ..data points at
}

// read reads the member's files as its app would: through ..data, the
// three files of one generation, verified against each other and the
// bundle among them. A rotation may swap ..data between two reads; that
// is retried, as the README tells applications to.
func (m *member) read(td spiffeid.TrustDomain) (files, error) {
	dir := fmt.Sprintf("/proc/%d/root%s", m.pid, fleetCertDir)
	var last error
	for range 3 {
		gen, err := os.Readlink(filepath.Join(dir, "..data"))
		if err != nil {
			return files{}, err
		}
		f, err := readGen(filepath.Join(dir, gen), td, m.id)
		if err == nil {
			f.gen = gen
			return f, nil
		}
		last = err
		if cur, _ := os.Readlink(filepath.Join(dir, "..data")); cur == gen {
			break // not a swap: the files themselves are wrong
		}
	}
	return files{}, fmt.Errorf("pod %s/%s: %w", m.pod.ns, m.pod.name, last)
}

func readGen(dir string, td spiffeid.TrustDomain, want string) (files, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, "svid.pem"))
	if err != nil {
		return files{}, err
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, "svid_key.pem"))
	if err != nil {
		return files{}, err
	}
	bundlePEM, err := os.ReadFile(filepath.Join(dir, "svid_bundle.pem"))
	if err != nil {
		return files{}, err
	}
	svid, err := x509svid.Parse(certPEM, keyPEM)
	if err != nil {
		return files{}, err
	}
	bundle, err := x509bundle.Parse(td, bundlePEM)
	if err != nil {
		return files{}, err
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		return files{}, fmt.Errorf("certificate does not verify against the bundle beside it: %w", err)
	}
	if svid.ID.String() != want {
		return files{}, fmt.Errorf("files hold %s, want %s", svid.ID, want)
	}
	return files{cert: svid.Certificates[0]}, nil
}

// snapshot reads every member's files; any error fails.
func (f *fleet) snapshot() ([]files, error) {
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	out := make([]files, len(f.members))
	var errs []error
	for i, m := range f.members {
		fs, err := m.read(td)
		if err != nil {
			errs = append(errs, err)
		}
		out[i] = fs
	}
	return out, errors.Join(errs...)
}

// serials are the members' certificate serial numbers.
func serials(fs []files) []string {
	s := make([]string, len(fs))
	for i, f := range fs {
		if f.cert != nil {
			s[i] = f.cert.SerialNumber.String()
		}
	}
	return s
}

// sighting is when a member's files were first seen holding a
// certificate.
type sighting struct {
	at      time.Time
	cert    *x509.Certificate
	atStart bool // already there at the watch's first sweep
}

// watching is a running watch.
type watching struct {
	done   chan struct{}
	wg     sync.WaitGroup
	fails  []string
	seen   []map[string]sighting
	sweeps samples // how long each sweep over all members took
}

// watch checks every member's files every interval (or continuously, if
// a sweep takes longer) until stop, recording every failure (a file
// unreadable, not matching its key or bundle, the wrong identity, or
// outside its validity) and when each member first held each
// certificate.
func (f *fleet) watch(interval time.Duration) *watching {
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	w := &watching{done: make(chan struct{}), seen: make([]map[string]sighting, len(f.members))}
	for i := range w.seen {
		w.seen[i] = map[string]sighting{}
	}
	w.wg.Go(func() {
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for sweep := 0; ; sweep++ {
			start := time.Now()
			for i, m := range f.members {
				fs, err := m.read(td)
				now := time.Now()
				switch {
				case err != nil:
					w.fails = append(w.fails, fmt.Sprintf("%s: %v", now.Format("15:04:05.000"), err))
				case now.Before(fs.cert.NotBefore) || now.After(fs.cert.NotAfter):
					w.fails = append(w.fails, fmt.Sprintf("%s: pod %s/%s: certificate valid %s to %s only", now.Format("15:04:05.000"), m.pod.ns, m.pod.name, fs.cert.NotBefore, fs.cert.NotAfter))
				default:
					s := fs.cert.SerialNumber.String()
					if _, ok := w.seen[i][s]; !ok {
						w.seen[i][s] = sighting{at: now, cert: fs.cert, atStart: sweep == 0}
					}
				}
			}
			w.sweeps = append(w.sweeps, time.Since(start))
			select {
			case <-w.done:
				return
			case <-tick.C:
			}
		}
	})
	return w
}

// stop ends the watch and returns its failures.
func (w *watching) stop() []string {
	close(w.done)
	w.wg.Wait()
	return w.fails
}

// reach is, for every certificate a member first held during the watch,
// the time from its issue (NotAfter − ttl: SPIRE backdates NotBefore) to
// the sweep that saw it in the member's files.
func (w *watching) reach(ttl time.Duration) samples {
	var s samples
	for _, m := range w.seen {
		for _, x := range m {
			if !x.atStart {
				s = append(s, x.at.Sub(x.cert.NotAfter.Add(-ttl)))
			}
		}
	}
	return s
}

// waitAllNew waits until every member's files hold a certificate other
// than the one in before, and returns when that was first seen complete.
func (f *fleet) waitAllNew(t *testing.T, before []string, d time.Duration, what string) time.Time {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		fs, err := f.snapshot()
		if err == nil {
			now := time.Now()
			var stale []string
			for i, s := range serials(fs) {
				if s == before[i] {
					stale = append(stale, f.members[i].pod.ns+"/"+f.members[i].pod.name)
				}
			}
			if len(stale) == 0 {
				return now
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: after %s, %d of %d pods still hold their old certificate: %s", what, d, len(stale), len(fs), strings.Join(stale[:min(len(stale), 10)], " "))
			}
		} else if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
