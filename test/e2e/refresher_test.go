package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

const rotatingID = "spiffe://example.org/workload/rotating"

// rotatingEnv is startEnv with rotatingID registered for every process
// of uid 0, with X.509-SVIDs that live ttl. The container's process keeps
// uid 0 after exec, so the entry matches both "runc init" at
// createRuntime and the container when the refresher attests it again.
func rotatingEnv(t *testing.T, ttl time.Duration) *env {
	e := startEnv(t)
	e.spire.CreateEntry(t, rotatingID, []string{"unix:uid:0"}, ttl)
	e.waitSynced()
	return e
}

// refresher is a running spiffe-oci-refresher binary.
type refresher struct {
	cmd *exec.Cmd
	log string
}

// startRefresher runs the refresher binary and waits for its systemd
// readiness notification (Type=notify), sent after its first scan.
func (e *env) startRefresher(t *testing.T) *refresher {
	t.Helper()
	return e.startRefresherWith(t, e.config)
}

// startRefresherWith is startRefresher with another node configuration.
func (e *env) startRefresherWith(t *testing.T, config string) *refresher {
	t.Helper()
	return e.startRefresherBin(t, refresherBin, config)
}

// startRefresherBin is startRefresherWith for a copy of the refresher at bin.
func (e *env) startRefresherBin(t *testing.T, bin, config string) *refresher {
	t.Helper()
	notify := filepath.Join(e.dir, fmt.Sprintf("notify-%d.sock", time.Now().UnixNano()))
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	log := filepath.Join(e.dir, "refresher.log")
	logf, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	// The audit reads the runtime roots these tests use: runc's and crun's
	// under each bundle, and /run/runc, Podman's. No CRI here.
	cmd := exec.Command(bin, "--config", config, "--backoff-min", "200ms", "--backoff-max", "2s", "--rescan-interval", "2s",
		"--audit-interval", auditInterval.String(), "--runtime-roots", "/tmp/e2e-*/runc-root,/tmp/e2e-*/crun-root,/run/runc",
		"--cri-sockets", filepath.Join(e.dir, "no-cri.sock"))
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := &refresher{cmd: cmd, log: log}
	t.Cleanup(func() { r.cmd.Process.Kill(); r.cmd.Wait() })
	t.Cleanup(func() { e.checkAudit(t, log) })
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 256)
	n, _, err := conn.ReadFromUnix(buf)
	if err != nil || !strings.Contains(string(buf[:n]), "READY=1") {
		t.Fatalf("no READY=1 from the refresher (%v, %q); log:\n%s", err, buf[:n], readFile(log))
	}
	return r
}

func readFile(p string) string { b, _ := os.ReadFile(p); return string(b) }

// watcher is a detached runc container that prints, every 300 ms, the
// cert and key of the generation cert_dir's ..data names: the safe way
// to read, as the README tells applications.
type watcher struct {
	b   *bundle
	out string
}

func (e *env) startWatcher(t *testing.T) *watcher {
	t.Helper()
	script := `while :; do g=$(readlink /certs/..data); echo "=== gen $g"; cat /certs/$g/svid.pem /certs/$g/svid_key.pem; echo "=== end"; sleep 0.3; done`
	b := newBundle(t, []string{"/bin/sh", "-c", script})
	b.AddAnnotation(annotation, "- cert_dir: /certs\n")
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	out := b.runDetached(t, "runc")
	return &watcher{b: b, out: out}
}

// kill stops the container without running poststop hooks: only the
// refresher can notice it is gone.
func (w *watcher) kill(t *testing.T) {
	t.Helper()
	root := filepath.Join(w.b.dir, "runc-root")
	if out, err := exec.Command("runc", "--root", root, "kill", w.b.id, "KILL").CombinedOutput(); err != nil {
		t.Fatalf("runc kill: %v: %s", err, out)
	}
}

// versions returns the distinct certificates the container has printed,
// in order, checking every version: a valid SVID for rotatingID, key
// matching, chaining to the trust bundle.
func (w *watcher) versions(t *testing.T, bundle *x509bundle.Bundle) []string {
	t.Helper()
	data := readFile(w.out)
	var serials []string
	sc := bufio.NewScanner(strings.NewReader(data))
	var cur bytes.Buffer
	in := false
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "=== gen "):
			in = true
			cur.Reset()
		case line == "=== end" && in:
			in = false
			certs, key := splitPEM(cur.String())
			svid, err := x509svid.Parse([]byte(certs), []byte(key))
			if err != nil {
				t.Fatalf("the container read a cert and key that do not match: %v", err)
			}
			if svid.ID.String() != rotatingID {
				t.Fatalf("the container read an SVID for %s", svid.ID)
			}
			if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
				t.Fatalf("the container read an SVID that does not chain to the bundle: %v", err)
			}
			s := svid.Certificates[0].SerialNumber.String()
			if len(serials) == 0 || serials[len(serials)-1] != s {
				serials = append(serials, s)
			}
		case in:
			cur.WriteString(line + "\n")
		}
	}
	return serials
}

func splitPEM(s string) (certs, key string) {
	i := strings.Index(s, "-----BEGIN PRIVATE KEY-----")
	if i < 0 {
		return s, ""
	}
	return s[:i], s[i:]
}

// waitVersions waits until the container has printed more than n versions.
func (w *watcher) waitVersions(t *testing.T, e *env, n int, d time.Duration) []string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		v := w.versions(t, e.spire.TrustBundle(t))
		if len(v) > n {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s the container saw %d certificate versions, want more than %d", d, len(v), n)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// TestRefresherLifecycle, against the real SPIRE agent: containers see
// their certificate rotate within the TTL; an agent outage longer than the
// backoff cap keeps the files valid and rotation resumes within 10 s of the
// agent's return; a SIGKILLed refresher resumes on restart and cleans up a
// container that exited meanwhile.
func TestRefresherLifecycle(t *testing.T) {
	const ttl = 30 * time.Second
	e := rotatingEnv(t, ttl)
	// The first refresher serves metrics: the outage below counts its
	// failed reconnects.
	metricsSocket := filepath.Join(e.dir, "refresher-metrics.sock")
	r := e.startRefresherWith(t, e.writeConfig("refresher:\n  metrics_socket: "+metricsSocket+"\n"))
	a, b := e.startWatcher(t), e.startWatcher(t)

	t.Run("rotation within the TTL", func(t *testing.T) {
		start := time.Now()
		v := a.waitVersions(t, e, 1, ttl)
		t.Logf("container saw a new certificate after %s (TTL %s); versions %v", time.Since(start).Round(time.Second), ttl, v)
	})

	t.Run("agent outage", func(t *testing.T) {
		before := len(a.versions(t, e.spire.TrustBundle(t)))
		failed := streamErrors(t, metricsSocket)
		e.spire.KillAgent(t)
		// Long enough that every stream's retries reach the 2 s backoff
		// cap (200 ms doubling: the fifth failure) and go on: six failed
		// reconnects per container, as the refresher counts them.
		deadline := time.Now().Add(60 * time.Second)
		for streamErrors(t, metricsSocket) < failed+2*6 {
			if time.Now().After(deadline) {
				t.Fatalf("after 60 s the refresher had not retried six times per container (stream errors %v -> %v)", failed, streamErrors(t, metricsSocket))
			}
			time.Sleep(200 * time.Millisecond)
		}
		if got := len(a.versions(t, e.spire.TrustBundle(t))); got != before {
			t.Errorf("certificate changed while the agent was down (%d -> %d versions)", before, got)
		}
		e.spire.StartAgent(t)
		back := time.Now()
		// The agent must start, attest and sync first: a margin that holds
		// on two busy cores (it takes 2-3 s on an idle machine).
		a.waitVersions(t, e, before, ttl)
		t.Logf("rotation resumed %s after the agent's return", time.Since(back).Round(100*time.Millisecond))
		log := readFile(r.log)
		if c := strings.Count(log, "agent unreachable"); c != 1 {
			t.Errorf("the outage was logged %d times, want once:\n%s", c, log)
		}
	})

	t.Run("refresher SIGKILL and restart", func(t *testing.T) {
		r.cmd.Process.Signal(syscall.SIGKILL)
		r.cmd.Wait()
		b.kill(t)
		before := len(a.versions(t, e.spire.TrustBundle(t)))
		restarted := time.Now()
		r = e.startRefresher(t)
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, err := os.Stat(filepath.Join(e.stateDir, "containers", b.b.id))
			if os.IsNotExist(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("state of the container that exited while the refresher was down is still there after 30 s")
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("dead container's state removed %s after the restart", time.Since(restarted).Round(10*time.Millisecond))
		a.waitVersions(t, e, before, ttl)
	})
}

// streamErrors reads the refresher's count of failed SVID streams (all
// kinds) from its metrics socket.
func streamErrors(t *testing.T, socket string) float64 {
	t.Helper()
	return metricSum(t, socket, "spiffe_oci_svid_stream_errors_total")
}
