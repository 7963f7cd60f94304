package e2e

// The refresher's audit against real runtimes: each way an annotated
// container can run without its identity, created for real, and reported
// with its cause; served containers under runc, crun and Podman are not.

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
	dto "github.com/prometheus/client_model/go"

	"github.com/noderesource/spiffe-oci-hook/internal/audit"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// sleeping returns an annotated bundle that sleeps, with hooks.
func sleeping(t *testing.T, hooks ...rspec.Hook) *bundle {
	b := newBundle(t, []string{"/bin/sleep", "600"})
	b.AddAnnotation(annotation, "- cert_dir: /certs\n")
	if len(hooks) > 0 {
		b.Config.Hooks = &rspec.Hooks{CreateRuntime: hooks}
	}
	return b
}

// waitUnserved waits until the refresher's audit reports container id
// without its identity, and returns the finding.
func waitUnserved(t *testing.T, socket, id string) audit.Unserved {
	t.Helper()
	start := time.Now()
	var found *audit.Unserved
	testhelp.Eventually(t, 10*auditInterval+10*time.Second, "the audit reports container "+id, func() bool {
		rep, err := status.NewClient(socket).Report(context.Background())
		if err != nil {
			return false
		}
		for _, u := range rep.Audit.Unserved {
			if u.ID == id {
				found = &u
				return true
			}
		}
		return false
	})
	t.Logf("reported %s after it started (audit interval %s): %s: %s", time.Since(start).Round(10*time.Millisecond), auditInterval, found.Cause, found.Detail)
	return *found
}

// TestAuditFindsUnserved: a runc container whose bundle lacks the hook, a
// Podman container run with --hooks-dir pointing elsewhere, a Podman
// --restart=always container whose restart dropped --hooks-dir, and a
// container let start by fail-open while the agent was down are each
// reported within an audit interval, with their cause, in the log, the
// status command and the metrics. Served containers under runc, crun and
// Podman are not reported, and the audit changes nothing on disk.
func TestAuditFindsUnserved(t *testing.T) {
	e := newEnv(t)
	failOpen := e.writeConfig("failure_policy: fail-open\n")
	r := e.startRefresher(t)
	socket := filepath.Join(e.stateDir, "refresher.sock")

	// Served: runc, crun and Podman.
	servedRunc := sleeping(t, e.hook(e.config))
	servedRunc.runDetached(t, "runc")
	running := 4 // served under runc and Podman, two without the hook
	if _, err := exec.LookPath("crun"); err == nil {
		running++
		b := sleeping(t, e.hook(e.config))
		b.Config.Version = "1.1.0" // Debian's crun refuses 1.2.x (see TestCrun)
		b.runDetached(t, "crun")
	}
	p := e.podmanNode(t, renderHooksDir(t, e.config))
	p.run(t, "served", "while :; do sleep 1; done", "--annotation", annotation+"=- cert_dir: /certs")

	// No hook in the bundle.
	noHook := sleeping(t)
	noHook.runDetached(t, "runc")
	e.expectUnserved(noHook.id)
	before := snapshot(t, noHook.dir)

	// Podman, --hooks-dir pointing elsewhere.
	elsewhere := filepath.Join(shortTempDir(t), "hooks.d")
	os.MkdirAll(elsewhere, 0o755)
	p.run(t, "elsewhere", "while :; do sleep 1; done", "--annotation", annotation+"=- cert_dir: /certs", "--hooks-dir", elsewhere)
	e.expectUnserved(p.id(t, "elsewhere"))

	u := waitUnserved(t, socket, noHook.id)
	if u.Cause != audit.CauseHookNotConfigured || !strings.Contains(u.Detail, "config.json") {
		t.Errorf("runc without the hook: %+v", u)
	}
	u = waitUnserved(t, socket, p.id(t, "elsewhere"))
	if u.Cause != audit.CauseHookNotConfigured || !strings.Contains(u.Detail, "Podman") {
		t.Errorf("Podman with --hooks-dir elsewhere: %+v", u)
	}

	t.Run("restart=always with --hooks-dir", func(t *testing.T) {
		// The first instance gets the hook from --hooks-dir; Podman's
		// restart policy starts the next one without that flag.
		flagged := e.podmanNode(t, elsewhere)
		flagged.run(t, "flagged", "while :; do sleep 1; done", "--restart=always", "--annotation", annotation+"=- cert_dir: /certs", "--hooks-dir", renderHooksDir(t, e.config))
		id := flagged.id(t, "flagged")
		e.expectUnserved(id)
		pid := flagged.pid(t, "flagged")
		testhelp.Eventually(t, 10*time.Second, "first instance served", func() bool {
			_, err := os.Stat(filepath.Join(e.stateDir, "records", id+".json"))
			return err == nil
		})
		exec.Command("kill", "-9", strconv.Itoa(pid)).Run()
		testhelp.Eventually(t, 30*time.Second, "restarted by its policy", func() bool { n := flagged.pid(t, "flagged"); return n != 0 && n != pid })
		u := waitUnserved(t, socket, id)
		if u.Cause != audit.CauseHookNotConfigured || u.PID == pid {
			t.Errorf("the restarted instance: %+v", u)
		}
	})

	t.Run("fail-open with the agent down", func(t *testing.T) {
		e.spire.KillAgent(t)
		b := sleeping(t, e.hook(failOpen))
		b.runDetached(t, "runc")
		e.expectUnserved(b.id)
		u := waitUnserved(t, socket, b.id)
		if u.Cause != audit.CauseFailOpen || !strings.Contains(u.Detail, "fail-open") {
			t.Errorf("fail-open start: %+v", u)
		}
		m := newMetricsClient(socket)
		m.waitMetric(t, 10*time.Second, "fail-open start counted", func(f map[string]*dto.MetricFamily) bool {
			v, _ := value(f, "spiffe_oci_fail_open_starts_total")
			return v >= 1
		})
		e.spire.StartAgent(t)
	})

	t.Run("metrics and status", func(t *testing.T) {
		m := newMetricsClient(socket)
		fams := m.waitMetric(t, 10*time.Second, "unserved containers counted", func(f map[string]*dto.MetricFamily) bool {
			v, _ := value(f, "spiffe_oci_unserved_containers", "cause", audit.CauseHookNotConfigured)
			return v >= 2
		})
		// The subtests' containers are gone.
		if v, _ := value(fams, "spiffe_oci_audit_checked_containers"); v < float64(running) {
			t.Errorf("spiffe_oci_audit_checked_containers = %v, want at least the %d annotated containers running", v, running)
		}
		out, errOut, code := refresherCmd(t, "status", "--config", e.config)
		if code != 0 {
			t.Fatalf("status: exit %d: %s", code, errOut)
		}
		for _, id := range []string{noHook.id, p.id(t, "elsewhere")} {
			if line := grepLine(out, id); !strings.Contains(line, "NO IDENTITY") || !strings.Contains(line, audit.CauseHookNotConfigured) {
				t.Errorf("status row for %s: %q\n%s", id, line, out)
			}
		}
		if line := grepLine(out, servedRunc.id); strings.Contains(line, "NO IDENTITY") {
			t.Errorf("served container reported: %s", line)
		}
		t.Logf("status:\n%s", out)
	})

	// Several audits ran over the unserved container: nothing of it changed.
	time.Sleep(3 * auditInterval)
	if diff := diffSnapshots(before, snapshot(t, noHook.dir)); len(diff) > 0 {
		t.Errorf("the audit changed the container's bundle or runtime state: %v", diff)
	}
	if log := readFile(r.log); strings.Count(log, "container="+noHook.id+" ") != 1 {
		t.Errorf("the unserved container was logged %d times, want once", strings.Count(log, "container="+noHook.id+" "))
	}
}
