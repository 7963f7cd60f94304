package refresh

import (
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestHeartbeat: a ready refresher marks the state directory as served,
// keeps marking it well within refresher_grace, and marks it once more
// when it stops, so that the grace counts from its stop.
func TestHeartbeat(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	n.cfg.RefresherGrace = 400 * time.Millisecond // a heartbeat every 100 ms
	if _, err := n.store.LastHeartbeat(); err == nil {
		t.Fatal("a heartbeat before any refresher ran")
	}
	start := time.Now()
	_, stop := n.start()
	first, err := n.store.LastHeartbeat()
	if err != nil || first.Before(start.Add(-time.Second)) {
		t.Fatalf("no heartbeat once ready: %v %v", first, err)
	}
	testhelp.Eventually(t, 2*time.Second, "a second heartbeat", func() bool {
		last, err := n.store.LastHeartbeat()
		return err == nil && last.After(first)
	})
	before := time.Now()
	stop()
	last, err := n.store.LastHeartbeat()
	if err != nil || last.Before(before.Add(-10*time.Millisecond)) {
		t.Errorf("last heartbeat %v, want one at the stop (%v)", last, before)
	}
}
