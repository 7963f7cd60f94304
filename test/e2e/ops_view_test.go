package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// TestRefresherOperatorView, against the real SPIRE agent and real runc
// containers: the metrics on the refresher's unix socket follow containers
// as they start, rotate and exit, and the earliest-expiry gauge is the
// earliest certificate on disk; /readyz goes false while the agent is down
// and true after; `status` lists every container while the refresher runs
// and after it stopped; SIGHUP applies a changed config without reopening
// any stream, and refuses a bad one with one line.
func TestRefresherOperatorView(t *testing.T) {
	const ttl = 30 * time.Second
	e := rotatingEnv(t, ttl)
	cfg := e.writeConfig("refresher:\n  log_level: info\n")
	r := e.startRefresherWith(t, cfg)
	socket := filepath.Join(e.stateDir, "refresher.sock")
	st, err := os.Stat(socket)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
		t.Errorf("metrics socket %s: mode %v, want a socket with mode 0600", socket, st.Mode())
	}
	m := newMetricsClient(socket)
	agentUp := func(f map[string]*dto.MetricFamily) float64 {
		v, _ := value(f, "spiffe_oci_agent_up", "socket", e.spire.AdminSocket)
		return v
	}
	gauge := func(f map[string]*dto.MetricFamily, name string) float64 {
		v, _ := value(f, name)
		return v
	}
	probe := func(what string) (string, int) {
		out, errOut, code := refresherCmd(t, "probe", "--config", cfg, what)
		return strings.TrimSpace(out + errOut), code
	}

	m.waitMetric(t, 20*time.Second, "ready with no container", func(f map[string]*dto.MetricFamily) bool {
		return agentUp(f) == 1 && gauge(f, "spiffe_oci_ready") == 1 && gauge(f, "spiffe_oci_containers") == 0
	})
	if out, code := probe("readyz"); code != 0 {
		t.Errorf("probe readyz with the agent up: exit %d: %s", code, out)
	}

	// The containers belong to the whole test (their cleanup runs at its end).
	var a, b *watcher
	parent := t
	t.Run("counts follow containers and rotations", func(t *testing.T) {
		a = e.startWatcher(parent)
		m.waitMetric(t, 20*time.Second, "one container, one open stream", func(f map[string]*dto.MetricFamily) bool {
			return gauge(f, "spiffe_oci_containers") == 1 && gauge(f, "spiffe_oci_svid_streams_open") == 1
		})
		b = e.startWatcher(parent)
		f := m.waitMetric(t, 20*time.Second, "two containers, two open streams", func(f map[string]*dto.MetricFamily) bool {
			return gauge(f, "spiffe_oci_containers") == 2 && gauge(f, "spiffe_oci_svid_streams_open") == 2
		})
		rotations := gauge(f, "spiffe_oci_rotations_total")
		a.waitVersions(t, e, 1, ttl)
		b.waitVersions(t, e, 1, ttl)
		f = m.waitMetric(t, 10*time.Second, "rotations counted", func(f map[string]*dto.MetricFamily) bool {
			return gauge(f, "spiffe_oci_rotations_total") >= rotations+2
		})
		t.Logf("rotations_total %v -> %v", rotations, gauge(f, "spiffe_oci_rotations_total"))
		if v := gauge(f, "spiffe_oci_write_failures_total"); v != 0 {
			t.Errorf("spiffe_oci_write_failures_total = %v", v)
		}
	})

	t.Run("earliest expiry is the earliest certificate on disk", func(t *testing.T) {
		// A rotation may land between the scrape and the read: retry
		// until both agree on one snapshot.
		var got float64
		var want time.Time
		for range 20 {
			f, err := m.scrape()
			if err != nil {
				t.Fatal(err)
			}
			v, ok := value(f, "spiffe_oci_svid_earliest_expiry_timestamp_seconds")
			if !ok {
				t.Fatal("no spiffe_oci_svid_earliest_expiry_timestamp_seconds with two containers served")
			}
			var n int
			want, n = diskExpiry(t, e.stateDir)
			if n != 2 {
				t.Fatalf("%d certificates on disk, want 2", n)
			}
			if got = v; got == float64(want.Unix()) {
				ratio, _ := value(f, "spiffe_oci_svid_lowest_remaining_lifetime_ratio")
				t.Logf("earliest expiry %s (in %s); lowest remaining lifetime ratio %.2f", want.UTC().Format(time.RFC3339), time.Until(want).Round(time.Second), ratio)
				if ratio <= 0 || ratio > 1 {
					t.Errorf("spiffe_oci_svid_lowest_remaining_lifetime_ratio = %v", ratio)
				}
				return
			}
			time.Sleep(300 * time.Millisecond)
		}
		t.Errorf("spiffe_oci_svid_earliest_expiry_timestamp_seconds = %v, the earliest certificate on disk expires at %d", got, want.Unix())
	})

	t.Run("status while running", func(t *testing.T) {
		out, errOut, code := refresherCmd(t, "status", "--config", cfg)
		if code != 0 || !strings.HasPrefix(out, "refresher: running") || !strings.Contains(out, "ready") {
			t.Fatalf("status: exit %d, stderr %q:\n%s", code, errOut, out)
		}
		t.Logf("status:\n%s", out)
		for _, w := range []*watcher{a, b} {
			f := statusLine(t, out, w.b.id)
			if f[1] != rotatingID || f[4] != "-" {
				t.Errorf("status line %q: want SPIFFE ID %s and no error", f, rotatingID)
			}
			if _, err := time.Parse(time.RFC3339, f[3]); err != nil {
				t.Errorf("status line %q: last rotation: %v", f, err)
			}
			// A rotation may land between status and this read.
			if na := certNotAfter(t, e.stateDir, w.b.id).UTC().Format(time.RFC3339); f[2] != na {
				t.Logf("status says not-after %s, disk now %s (rotated in between?)", f[2], na)
				if p, err := time.Parse(time.RFC3339, f[2]); err != nil || p.After(certNotAfter(t, e.stateDir, w.b.id)) {
					t.Errorf("status line %q: not-after is not the certificate's", f)
				}
			}
		}
	})

	t.Run("a container that exits is no longer counted", func(t *testing.T) {
		b.kill(t)
		m.waitMetric(t, 20*time.Second, "one container after the other exited", func(f map[string]*dto.MetricFamily) bool {
			return gauge(f, "spiffe_oci_containers") == 1 && gauge(f, "spiffe_oci_svid_streams_open") == 1
		})
	})

	t.Run("readiness follows the agent", func(t *testing.T) {
		e.spire.KillAgent(t)
		m.waitMetric(t, 20*time.Second, "agent down", func(f map[string]*dto.MetricFamily) bool {
			return agentUp(f) == 0 && gauge(f, "spiffe_oci_ready") == 0
		})
		out, code := probe("readyz")
		if code == 0 || !strings.Contains(out, "agent unreachable") {
			t.Errorf("probe readyz with the agent down: exit %d: %s", code, out)
		}
		if out, code := probe("healthz"); code != 0 {
			t.Errorf("probe healthz with the agent down: exit %d: %s (the process is alive)", code, out)
		}
		t.Logf("readyz while the agent is down: %s", out)
		e.spire.StartAgent(t)
		m.waitMetric(t, 30*time.Second, "agent back, streams reopened", func(f map[string]*dto.MetricFamily) bool {
			return agentUp(f) == 1 && gauge(f, "spiffe_oci_ready") == 1 && gauge(f, "spiffe_oci_svid_streams_open") == 1
		})
		if out, code := probe("readyz"); code != 0 {
			t.Errorf("probe readyz after the agent's return: exit %d: %s", code, out)
		}
	})

	t.Run("SIGHUP applies a changed config without reopening streams", func(t *testing.T) {
		f, _ := m.scrape()
		opened := gauge(f, "spiffe_oci_svid_streams_opened_total")
		if strings.Contains(readFile(r.log), "level=DEBUG") {
			t.Fatal("debug lines before log_level: debug")
		}
		if err := os.WriteFile(cfg, []byte(strings.Replace(readFile(cfg), "log_level: info", "log_level: debug", 1)), 0o600); err != nil {
			t.Fatal(err)
		}
		r.signal(t, syscall.SIGHUP)
		r.waitLog(t, 10*time.Second, "configuration reloaded", 1)
		// The new level shows at the next rotation.
		r.waitLog(t, ttl, `msg=rotated container=`+a.b.id, 1)
		f, _ = m.scrape()
		if got := gauge(f, "spiffe_oci_svid_streams_opened_total"); got != opened {
			t.Errorf("spiffe_oci_svid_streams_opened_total %v -> %v across the reload: a stream was reopened", opened, got)
		}
		if got := gauge(f, "spiffe_oci_svid_streams_open"); got != 1 {
			t.Errorf("spiffe_oci_svid_streams_open = %v after the reload", got)
		}
		if got := gauge(f, "spiffe_oci_config_last_reload_successful"); got != 1 {
			t.Errorf("spiffe_oci_config_last_reload_successful = %v", got)
		}
	})

	t.Run("SIGHUP with a bad config is refused with one line", func(t *testing.T) {
		good := readFile(cfg)
		defer os.WriteFile(cfg, []byte(good), 0o600)
		if err := os.WriteFile(cfg, []byte(good+"refresher_typo: 1\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		before := readFile(r.log)
		r.signal(t, syscall.SIGHUP)
		log := r.waitLog(t, 10*time.Second, "reload refused", 1)
		added := strings.Split(strings.TrimSpace(strings.TrimPrefix(log, before)), "\n")
		var refusals []string
		for _, l := range added {
			if strings.Contains(l, "level=ERROR") {
				refusals = append(refusals, l)
			}
		}
		if len(refusals) != 1 || !strings.Contains(refusals[0], "refresher_typo") {
			t.Errorf("want one error line naming the bad key, got:\n%s", strings.Join(refusals, "\n"))
		}
		t.Logf("refusal: %s", refusals[0])
		m.waitMetric(t, 5*time.Second, "reload failure counted", func(f map[string]*dto.MetricFamily) bool {
			v, _ := value(f, "spiffe_oci_config_reloads_total", "result", "failure")
			return v == 1 && gauge(f, "spiffe_oci_config_last_reload_successful") == 0
		})
		// The running configuration (log_level: debug) stays in force: the
		// next rotation is logged at debug level too.
		n := strings.Count(readFile(r.log), "msg=rotated container="+a.b.id)
		r.waitLog(t, ttl, "msg=rotated container="+a.b.id, n+1)
		if err := r.cmd.Process.Signal(syscall.Signal(0)); err != nil {
			t.Fatalf("refresher gone after a bad reload: %v", err)
		}
		// state_dir cannot change live: refused, named.
		os.WriteFile(cfg, []byte(strings.Replace(good, "state_dir: "+e.stateDir, "state_dir: /run/elsewhere", 1)), 0o600)
		r.signal(t, syscall.SIGHUP)
		r.waitLog(t, 10*time.Second, "state_dir cannot change while the refresher runs", 1)
	})

	t.Run("status after the refresher stopped", func(t *testing.T) {
		r.signal(t, syscall.SIGTERM)
		r.cmd.Wait()
		if _, err := os.Stat(socket); !os.IsNotExist(err) {
			t.Errorf("metrics socket still there after a clean stop: %v", err)
		}
		out, errOut, code := refresherCmd(t, "status", "--config", cfg)
		if code != 3 || !strings.HasPrefix(out, "refresher: NOT RUNNING") {
			t.Fatalf("status with the refresher down: exit %d (want 3), stderr %q:\n%s", code, errOut, out)
		}
		t.Logf("status:\n%s", out)
		f := statusLine(t, out, a.b.id)
		if want := certNotAfter(t, e.stateDir, a.b.id).UTC().Format(time.RFC3339); f[1] != rotatingID || f[2] != want {
			t.Errorf("status line %q: want %s, not-after %s", f, rotatingID, want)
		}
		if _, code := probe("healthz"); code == 0 {
			t.Error("probe healthz exits 0 with the refresher stopped")
		}
	})
}
