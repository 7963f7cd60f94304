package status

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/internal/record"
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
	running, err := Show(context.Background(), &out, record.Store{Dir: dir}, filepath.Join(dir, "refresher.sock"))
	if err != nil || running {
		t.Fatalf("Show() = %v, %v", running, err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "refresher: NOT RUNNING (") || !strings.Contains(lines[0], "refresher.sock") || !strings.HasPrefix(lines[1], "CONTAINER") {
		t.Errorf("output:\n%s", out.String())
	}
}
