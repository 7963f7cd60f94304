package status

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/audit"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

func TestReady(t *testing.T) {
	up := Agent{Socket: "/a.sock", Reachable: true}
	down := Agent{Socket: "/b.sock"}
	for _, tc := range []struct {
		r    Report
		want bool
		why  string
	}{
		{Report{Agents: []Agent{up}}, false, "first scan of the state directory not done"},
		{Report{Scanned: true}, false, "no agent connection"},
		{Report{Scanned: true, Agents: []Agent{up, down}}, false, "agent unreachable: /b.sock"},
		{Report{Scanned: true, Agents: []Agent{up}}, true, "ready"},
	} {
		ok, why := tc.r.Ready()
		if ok != tc.want || why != tc.why {
			t.Errorf("%+v: Ready() = %v, %q; want %v, %q", tc.r, ok, why, tc.want, tc.why)
		}
	}
}

// TestShowDown: with no refresher on the socket, the first line says so
// and names the socket, and the exit status is the caller's to set.
func TestShowDown(t *testing.T) {
	dir := t.TempDir()
	var out bytes.Buffer
	running, err := Show(context.Background(), &out, statedir.Store{Dir: dir}, filepath.Join(dir, "refresher.sock"))
	if err != nil || running {
		t.Fatalf("Show() = %v, %v", running, err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "refresher: NOT RUNNING (") || !strings.Contains(lines[0], "refresher.sock") || !strings.HasPrefix(lines[1], "CONTAINER") {
		t.Errorf("output:\n%s", out.String())
	}
}

// TestAuditRows: the last audit's summary line, and one row per container
// without its identity and per annotation naming no container.
func TestAuditRows(t *testing.T) {
	if got := auditSummary(audit.Result{}); got != "audit: not run yet" {
		t.Errorf("before the first audit: %q", got)
	}
	a := audit.Result{
		Time: time.Date(2026, 12, 5, 3, 0, 0, 0, time.UTC), Checked: 3, FailOpen: 1,
		Unserved:  []audit.Unserved{{ID: "abc", Pod: "web", Namespace: "shop", Name: "app", Cause: audit.CauseHookNotConfigured, Detail: "the runtime did not\nrun it"}},
		Unmatched: []audit.Unmatched{{Pod: "web", Namespace: "shop", Annotation: "identity.noderesource.dev/container.ap", Containers: []string{"app", "side"}}},
	}
	if got, want := auditSummary(a), "audit: 2026-12-05T03:00:00Z: 3 running containers asked for an identity, 1 WITHOUT one; 1 annotations name no container; 1 fail-open starts"; got != want {
		t.Errorf("summary %q, want %q", got, want)
	}
	var out bytes.Buffer
	auditRows(&out, a)
	want := "abc\t-\t-\t-\tNO IDENTITY (pod shop/web, container app): hook_not_configured: the runtime did not run it\n" +
		"pod shop/web\t-\t-\t-\tannotation identity.noderesource.dev/container.ap names no container of the pod (containers: app,side)\n"
	if out.String() != want {
		t.Errorf("rows:\n%q\nwant\n%q", out.String(), want)
	}
}
