package refresh

import (
	"context"
	"errors"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/audit"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
)

// runAudits audits the node's running containers at start and then every
// audit interval (package audit), until ctx ends. Report serves the last
// result; the auditor logs each finding once.
func (r *Refresher) runAudits(ctx context.Context) {
	a := audit.New(r.store, func() config.Audit { return r.settings().Audit }, r.log)
	t := time.NewTimer(0)
	defer t.Stop()
	last := [4]int{-1}
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.auditReloaded:
			if !t.Stop() {
				select {
				case <-t.C:
				default:
				}
			}
			t.Reset(r.settings().Audit.Interval)
		case <-t.C:
			rep := a.Run(ctx)
			r.audit.Store(&rep)
			// One line when the counts change: an operator (and a test)
			// sees that audits run and what they found, without a line
			// every interval.
			if now := [4]int{rep.Checked, len(rep.Unserved), len(rep.Unmatched), int(rep.FailOpen)}; now != last {
				last = now
				r.log.Info("audit", "checked", rep.Checked, "unserved", len(rep.Unserved), "unmatched_annotations", len(rep.Unmatched), "fail_open_starts", rep.FailOpen)
			}
			t.Reset(r.settings().Audit.Interval)
		}
	}
}

// pruneFailOpen removes the fail-open traces of containers gone for a
// while (poststop removes them too, when it runs). The audit counts a
// trace when it first sees it, within one audit interval.
func (r *Refresher) pruneFailOpen() {
	traces, err := r.store.FailOpens()
	if err != nil {
		r.log.Error("scanning state directory", logkey.Error, err)
		return
	}
	for _, f := range traces {
		if time.Since(f.Time) < orphanAge {
			continue
		}
		p, err := process.OpenRecorded(f.PID, f.StartTime)
		if err == nil {
			p.Close()
			continue
		}
		if errors.Is(err, process.ErrGone) {
			if err := r.store.RemoveFailOpen(f.ID); err != nil {
				r.log.Error("removing fail-open trace", logkey.Container, f.ID, logkey.Error, err)
			}
		}
	}
}
