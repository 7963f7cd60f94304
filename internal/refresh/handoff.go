package refresh

import (
	"context"
	"fmt"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/deliver"
	"github.com/noderesource/spiffe-oci-hook/internal/handoff"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// handoffSlots bounds the containers the refresher delivers for the hook
// at once; more wait in the socket's backlog. Each holds an agent stream
// and a pidfd for the length of one fetch.
const handoffSlots = 16

// listenHandoff binds the state directory's handoff socket (package
// handoff), or logs why not: the hook asks the agent itself then, as with
// no refresher.
func (r *Refresher) listenHandoff() *handoff.Listener {
	ln, err := handoff.Listen(r.store.HandoffSocket())
	if err != nil {
		r.log.Error("not taking containers over from the hook", logkey.Error, err)
		return nil
	}
	return ln
}

// serveHandoff takes containers over from the hook on ln until ctx ends.
func (r *Refresher) serveHandoff(ctx context.Context, ln *handoff.Listener) {
	s := handoff.Server{
		Handler:       r.deliver,
		Log:           r.log,
		MaxConcurrent: handoffSlots,
		ReadTimeout:   5 * time.Second,
		Settle:        r.settleHandoff,
	}
	if err := s.Serve(ctx, ln); err != nil {
		r.log.Error("handoff socket", logkey.Error, err)
	}
}

// deliver serves a container the hook handed over: the same delivery the
// hook would make (package deliver), over the refresher's open connection
// to the agent and with the bundles it follows. The hook mounts the files
// and records the container; the record's appearance makes the refresher
// keep it fresh, as for any container.
func (r *Refresher) deliver(ctx context.Context, req handoff.Request, proc *process.Process) (statedir.Record, error) {
	cfg := *r.live.Load()
	// The hook's waits, not the refresher's: the hook waits for the
	// answer, and its node configuration may have been edited apart.
	if req.Timeout > 0 {
		cfg.Timeout, cfg.RegistrationWait = req.Timeout, req.RegistrationWait
	}
	d := deliver.Deliverer{Config: cfg, Writer: r.Writer, Labeler: r.Labeler, Log: r.log}
	result := "refused"
	start := time.Now()
	defer func() {
		r.Metrics.Handoffs.WithLabelValues(result).Inc()
		r.Metrics.HandoffSeconds.WithLabelValues(result).Observe(time.Since(start).Seconds())
	}()
	rec, err := d.Deliver(ctx, func(socket string) (deliver.Agent, error) {
		a := r.agent(ctx, socket)
		if a.client == nil {
			return deliver.Agent{}, fmt.Errorf("agent %s: no client", socket)
		}
		to := deliver.Agent{Client: a.client}
		if a.reachable() {
			to.Bundles, _ = a.Bundles(ctx)
		}
		return to, nil
	}, proc, req)
	if err == nil {
		result = "delivered"
	}
	return rec, err
}

// settleHandoff runs once the hook has the answer to a container it handed
// over, or could not take it. The hook holds the container's lock from
// before it hands the container over until it has recorded it, or removed
// what was written when it failed; so once the lock is free, a container
// with files and no record is one whose hook gave up (its timeout ran out
// while the refresher was still fetching or writing) and removed what
// little was there before the refresher wrote the rest. Those files are
// removed now, instead of staying until the orphan sweep (orphanAge).
func (r *Refresher) settleHandoff(req handoff.Request) {
	if ocistate.ValidateID(req.ID) != nil {
		return // refused as such: nothing was written
	}
	removed, err := r.store.RemoveOrphan(req.ID)
	r.hooks.settled(req.ID, removed)
	switch {
	case err != nil:
		r.log.Error("removing what was written for a container the hook did not record", logkey.Container, req.ID, logkey.Error, err)
	case removed:
		r.log.Info("removed what was written for a container the hook did not record (it gave up waiting, or failed after the answer)", logkey.Container, req.ID)
	}
}
