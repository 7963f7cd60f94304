package refresh

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/handoff"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// handOver plays the hook's part of a handoff for the process pid: it
// holds container id's lock across the exchange, as the hook does, and,
// when the exchange fails, removes what was written and leaves the trace
// of a fail-open start (failure_policy: fail-open) before letting go. It
// returns the hook's error; on success it records the container.
func (n *node) handOver(ctx context.Context, id string, pid int) error {
	n.t.Helper()
	proc, err := process.Open(pid)
	if err != nil {
		n.t.Fatal(err)
	}
	defer proc.Close()
	lock, err := n.store.Lock(id)
	if err != nil {
		n.t.Fatal(err)
	}
	defer lock.Unlock()
	req := handoff.Request{ID: id, Key: annotations.Key, Value: `[{"cert_dir": "/run/spiffe"}]`, Timeout: 10 * time.Second, RegistrationWait: 10 * time.Second}
	rec, err := handoff.Deliver(ctx, n.store.HandoffSocket(), req, proc.FD())
	if err != nil {
		if rmErr := n.store.RemoveLocked(id); rmErr != nil {
			n.t.Fatal(rmErr)
		}
		if foErr := n.store.SaveFailOpen(statedir.FailOpen{ID: id, PID: proc.PID, StartTime: proc.StartTime, Error: err.Error(), Time: time.Now()}); foErr != nil {
			n.t.Fatal(foErr)
		}
		return err
	}
	if err := n.store.Save(rec); err != nil {
		n.t.Fatal(err)
	}
	return nil
}

// TestHandoffGivenUp: a hook that gives up waiting (its timeout) while the
// refresher is still waiting for the container's entry removes what was
// there and lets go; what the refresher writes after that is removed as
// soon as it has answered, not left until the orphan sweep (orphanAge).
// A container the hook recorded keeps its files.
func TestHandoffGivenUp(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	n.agent.Default = nil // no entry yet: the refresher waits (registration_wait)
	settled := make(chan bool, 2)
	r, _ := n.start(func(r *Refresher) {
		r.hooks.settled = func(_ string, removed bool) { settled <- removed }
	})

	p := n.workloadProcess()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	err := n.handOver(ctx, "given-up", p.Process.Pid)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hook's handoff = %v; want its deadline", err)
	}
	// The entry arrives: the refresher writes, and answers a hook that
	// is gone.
	n.agent.Set(p.Process.Pid, workload)
	delivered := r.Metrics.Handoffs.WithLabelValues("delivered")
	testhelp.Eventually(t, 15*time.Second, "the refresher delivered", func() bool { return testutil.ToFloat64(delivered) == 1 })
	testhelp.Eventually(t, 5*time.Second, "files of the container its hook gave up removed", func() bool {
		_, err := os.Lstat(n.store.ContainerDir("given-up"))
		return errors.Is(err, os.ErrNotExist)
	})
	if removed := <-settled; !removed {
		t.Error("the refresher reported nothing removed for the container its hook gave up")
	}
	if traces, err := n.store.FailOpens(); err != nil || len(traces) != 1 {
		t.Errorf("fail-open traces after the refresher's clean-up: %v, %v; want the hook's, which the audit reports", traces, err)
	}
	if !strings.Contains(n.logs.String(), "did not record") {
		t.Errorf("no line says why the files were removed:\n%s", n.logs)
	}

	q := n.workloadProcess()
	n.agent.Set(q.Process.Pid, workload)
	if err := n.handOver(context.Background(), "recorded", q.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if removed := <-settled; removed {
		t.Error("the refresher removed the files of a container its hook recorded")
	}
	if _, err := os.Lstat(n.store.DeliveryDir("recorded", 0)); err != nil {
		t.Errorf("recorded container's files: %v", err)
	}
	testhelp.Eventually(t, 5*time.Second, "recorded container served", func() bool { return r.Count() == 1 })
}
