package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
)

// TestRequireRefresher: with require_refresher (what the Kubernetes
// DaemonSet installs), the real hook under runc, against the real agent
// and the real refresher binary:
//   - before any refresher served the node, an annotated container is
//     refused with the hook's one line and never runs; a container that
//     asked for nothing starts;
//   - with the refresher running, the container gets its identity;
//   - a rolling update: the refresher stops (SIGTERM), a container created
//     before its successor starts gets its identity (within
//     refresher_grace), and the successor rotates it;
//   - an uninstall: the refresher stops for good; once refresher_grace has
//     passed, an annotated container is refused with the line that says
//     what to do, and nothing of it is left.
func TestRequireRefresher(t *testing.T) {
	const ttl = 20 * time.Second
	e := rotatingEnv(t, ttl)
	const grace = 4 * time.Second
	e.config = e.writeConfig(fmt.Sprintf("require_refresher: true\nrefresher_grace: %s\n", grace))

	run := func(t *testing.T, annotated bool) (*bundle, string, string, error) {
		t.Helper()
		b := newBundle(t, []string{"/bin/sh", "-c", "cat /certs/svid.pem 2>&1; echo STARTED"})
		if annotated {
			b.AddAnnotation(annotation, "- cert_dir: /certs\n")
		}
		b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
		out, stderr, err := b.runc(t)
		return b, out, stderr, err
	}
	refused := func(t *testing.T, want string) {
		t.Helper()
		b, out, stderr, err := run(t, true)
		if err == nil || strings.Contains(out, "STARTED") {
			t.Fatalf("the annotated container ran (err %v): %s", err, out)
		}
		if !strings.Contains(stderr, want) || !strings.Contains(stderr, "docs/install-lifecycle.md") {
			t.Errorf("runc's error lacks the hook's line %q and what to do: %s", want, stderr)
		}
		t.Logf("runc: %s", strings.TrimSpace(stderr))
		for _, p := range e.listState() {
			if strings.Contains(p, b.id) {
				t.Errorf("state directory holds %s of the refused container", p)
			}
		}
	}
	served := func(t *testing.T) {
		t.Helper()
		_, out, stderr, err := run(t, true)
		if err != nil || !strings.Contains(out, "BEGIN CERTIFICATE") || !strings.Contains(out, "STARTED") {
			t.Fatalf("the annotated container did not start with its certificate: %v\n%s\n%s", err, out, stderr)
		}
	}

	t.Run("no refresher yet: refused, nothing runs", func(t *testing.T) {
		refused(t, "no spiffe-oci-refresher has served this node yet")
	})
	t.Run("a container that asked for nothing starts", func(t *testing.T) {
		if _, out, stderr, err := run(t, false); err != nil || !strings.Contains(out, "STARTED") {
			t.Fatalf("the container without annotation did not start: %v\n%s\n%s", err, out, stderr)
		}
	})

	r := e.startRefresherWith(t, e.config)
	t.Run("with the refresher: the identity", func(t *testing.T) { served(t) })

	top := t
	t.Run("rolling update: created between two refreshers, served by the second", func(t *testing.T) {
		r.cmd.Process.Signal(syscall.SIGTERM)
		r.cmd.Wait()
		w := e.startWatcher(t)
		w.waitVersions(t, e, 0, 10*time.Second)
		// The successor outlives this subtest: the next one stops it with
		// SIGTERM (a cleanup of this subtest would SIGKILL it, and leave
		// no stop's mark to check).
		r = e.startRefresherWith(top, e.config)
		start := time.Now()
		v := w.waitVersions(t, e, 1, ttl+10*time.Second)
		t.Logf("the container created between the refreshers saw a new certificate %s after the second one started; versions %v",
			time.Since(start).Round(time.Second), v)
	})

	t.Run("uninstall: refused once refresher_grace has passed", func(t *testing.T) {
		// The stop's mark is written after SIGTERM; how long the exit
		// takes after it is not what this checks.
		signalled := time.Now()
		if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatalf("the refresher was not running before its uninstall: %v", err)
		}
		if err := r.cmd.Wait(); err != nil {
			t.Fatalf("the refresher did not stop cleanly on SIGTERM: %v", err)
		}
		stopped := time.Now()
		last, err := os.Stat(filepath.Join(e.stateDir, "refresher.alive"))
		if err != nil || last.ModTime().Before(signalled.Add(-time.Second)) {
			t.Fatalf("the stopping refresher left no fresh heartbeat: %v %v", last, err)
		}
		time.Sleep(time.Until(stopped.Add(grace + 500*time.Millisecond)))
		refused(t, "no spiffe-oci-refresher has served this node since")
	})
}
