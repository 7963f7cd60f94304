// Package hook is what spiffe-oci-hook does at each stage: deliver a
// container's identity at createRuntime (or prestart), and forget the
// container at poststop.
package hook

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/handoff"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/mount"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/internal/userns"
)

// Hook holds what every stage needs.
type Hook struct {
	Config config.Config
	// Log receives lines worth an operator's attention that do not stop
	// the container (fail-open); nil drops them. spiffe-oci-hook's is
	// NewLogger's.
	Log *slog.Logger
	// Deliver fetches the container's identity and writes its files into
	// the state directory, returning its record: the refresher, over its
	// warm agent connection (Handoff), or the hook itself (package
	// deliver's Direct, spiffe-oci-hook-direct).
	Deliver DeliverFunc
}

// DeliverFunc fetches a container's identity and writes its files into
// the state directory, returning the container's record for Create to
// save once the files are mounted.
type DeliverFunc = func(ctx context.Context, proc *process.Process, req handoff.Request) (statedir.Record, error)

// Request is a container that asked for an identity.
type Request struct {
	State      *specs.State
	Spec       *specs.Spec
	Key        string // the annotation that asked
	Value      string // its value, as the spec holds it
	Deliveries []annotations.Delivery
}

// ErrAnnotationQuoted: the container's identity annotation key begins with
// a double quote (annotations.Misquoted). The hooks.d "when" matches such a
// key too, so that the container is refused rather than started silently
// without the identity it asked for.
var ErrAnnotationQuoted = errors.New("Podman 5 passes --annotation as written, so quotes meant for Podman 4's CSV parsing stay in the key and value; " +
	"write --annotation KEY=VALUE without them (docs/podman.md)")

// ErrAnnotationDropped: containerd ran the hook for a pod's container whose
// OCI spec carries no identity annotation. The hook is injected under
// containerd only for a pod that asked: spiffe-oci-nri copies the
// annotation into the spec, but NRI's hook-injector matches the pod's
// annotations and leaves the spec as containerd built it, which holds pod
// annotations only when the runtime handler's pod_annotations allows them.
var ErrAnnotationDropped = errors.New("containerd ran the hook, but the container's OCI spec has no " + annotations.Key +
	" annotation: the pod's annotation was dropped (NRI's hook-injector matches pod annotations; containerd copies them into the spec only when allowed); " +
	`run spiffe-oci-nri instead of hook-injector, or set pod_annotations = ["identity.noderesource.dev/*"] on every containerd runtime handler`)

// Find decides whether the container behind state asked for an identity.
// It reads config.json only when the state carries no annotations, so the
// common no-annotation path costs one small JSON decode. A container that
// asked with a value that does not parse gets a Request (with Key set) as
// well as the error, so that the node's failure policy applies to it too.
// So does a containerd container whose pod's annotation was dropped
// (ErrAnnotationDropped): under CRI-O and Podman the hooks.d "when" sees
// the same annotations as the hook, and spiffe-oci-nri copies every
// identity annotation of the pod, so only that case runs the hook for a
// containerd container without any.
func Find(state *specs.State) (*Request, error) {
	ann := state.Annotations
	var spec *specs.Spec
	if len(ann) == 0 {
		var err error
		if spec, err = ocistate.LoadSpec(state.Bundle); err != nil {
			return nil, err
		}
		ann = spec.Annotations
	}
	key, value, ok := annotations.Find(ann)
	if !ok {
		if k, bad := annotations.Misquoted(ann); bad {
			return &Request{State: state, Spec: spec, Key: annotations.Key}, fmt.Errorf("annotation %.100q begins with a double quote: %w", k, ErrAnnotationQuoted)
		}
		if ann[annotations.ContainerdContainerType] == annotations.ContainerdTypeContainer && !hasIdentityKey(ann) {
			return &Request{State: state, Spec: spec, Key: annotations.Key}, ErrAnnotationDropped
		}
		return nil, nil
	}
	req := &Request{State: state, Spec: spec, Key: key, Value: value}
	var err error
	if req.Deliveries, err = annotations.Parse(key, value); err != nil {
		return req, err
	}
	if req.Spec == nil {
		if req.Spec, err = ocistate.LoadSpec(state.Bundle); err != nil {
			return req, err
		}
	}
	return req, nil
}

// hasIdentityKey reports whether any identity annotation is present, for
// this container or another one of its pod.
func hasIdentityKey(ann map[string]string) bool {
	for k := range ann {
		if annotations.IsIdentityKey(k) {
			return true
		}
	}
	return false
}

// Create delivers the identity: Deliver fetches the SVID for the
// container's pid and writes the files; Create mounts them at every
// cert_dir and records the container for the refresher. On error nothing
// is left in the state directory.
func (h *Hook) Create(ctx context.Context, req *Request) (err error) {
	id := req.State.ID
	owner, err := userns.HostOwner(req.Spec)
	if err != nil {
		return err
	}
	if req.State.Pid <= 0 {
		return errors.New("OCI state has no pid: run the hook at createRuntime or prestart, not before the container exists")
	}
	proc, err := process.Open(req.State.Pid)
	if err != nil {
		return fmt.Errorf("container process: %w", err)
	}
	defer proc.Close()
	// Runs twice for one container (CRI-O registering prestart and
	// createRuntime, or the NRI plugin and hook-injector both injecting):
	// the first run delivered, mounted and recorded; do not mount again.
	store := statedir.Store{Dir: h.Config.StateDir}
	if rec, err := store.Load(id); err == nil && rec.PID == proc.PID && rec.StartTime == proc.StartTime {
		return nil
	}
	if err := h.CheckRefresher(time.Now()); err != nil {
		return err
	}

	if err := store.Init(); err != nil {
		return err
	}
	// The refresher may be cleaning up after an earlier instance under
	// this ID (podman restart): hold the container's lock from the first
	// file to the record, so it never removes what this delivery writes.
	// A refresher that takes the container over writes under this lock.
	lock, err := store.Lock(id)
	if err != nil {
		return err
	}
	defer lock.Unlock()
	defer func() {
		if err != nil {
			if rmErr := store.RemoveLocked(id); rmErr != nil {
				err = fmt.Errorf("%w (and cleaning up: %v)", err, rmErr)
			}
		}
	}()
	hr := handoff.Request{ID: id, Key: req.Key, Value: req.Value, Owner: owner, Timeout: h.Config.Timeout, RegistrationWait: h.Config.RegistrationWait}
	if req.Spec.Linux != nil {
		hr.MountLabel = req.Spec.Linux.MountLabel
	}
	rec, err := h.Deliver(ctx, proc, hr)
	if err != nil {
		return err
	}
	if len(rec.Deliveries) != len(req.Deliveries) {
		return fmt.Errorf("annotation %s: %d deliveries asked for, %d written", req.Key, len(req.Deliveries), len(rec.Deliveries))
	}
	rootfs := ocistate.RootfsPath(req.State.Bundle, req.Spec)
	for i, d := range req.Deliveries {
		if err := mount.Bind(proc.FD(), rootfs, store.DeliveryDir(id, i), d.CertDir); err != nil {
			return fmt.Errorf("annotation %s: cert_dir %s: %w", req.Key, d.CertDir, err)
		}
	}
	return store.Save(rec)
}

// Handoff is the Deliver that hands the container over to the refresher
// listening on the state directory's handoff socket (package handoff),
// within the node's timeout. An error wrapping handoff.ErrUnavailable
// means no refresher answered: the caller may deliver directly.
func (h *Hook) Handoff(ctx context.Context, proc *process.Process, req handoff.Request) (statedir.Record, error) {
	// The refresher's own fetch is bounded by timeout; the margin is for
	// its writing and answering.
	ctx, cancel := context.WithTimeout(ctx, h.Config.Timeout+2*time.Second)
	defer cancel()
	return handoff.Deliver(ctx, statedir.Store{Dir: h.Config.StateDir}.HandoffSocket(), req, proc.FD())
}

// refresherHint is what to do about a node no refresher serves.
const refresherHint = "its identity would never be rotated and would expire in place; start spiffe-oci-refresher on this node " +
	"(Kubernetes: the spiffe-oci-hook DaemonSet's pod; systemd: systemctl start spiffe-oci-refresher), " +
	"or, if spiffe-oci-hook was uninstalled, remove its hooks JSON from this node (docs/install-lifecycle.md)"

// CheckRefresher refuses, on a node whose configuration requires a
// refresher (require_refresher), a container whose identity nothing would
// rotate: no refresher has served the state directory within
// refresher_grace before now. A refresher restarting (a DaemonSet's rolling
// update, a systemd restart) stays within the grace; a refresher removed
// with its DaemonSet does not.
func (h *Hook) CheckRefresher(now time.Time) error {
	if !h.Config.RequireRefresher {
		return nil
	}
	last, err := statedir.Store{Dir: h.Config.StateDir}.LastHeartbeat()
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("no spiffe-oci-refresher has served this node yet (require_refresher: true): %s", refresherHint)
	case err != nil:
		return fmt.Errorf("reading the refresher's heartbeat: %w", err)
	case now.Sub(last) > h.Config.RefresherGrace:
		return fmt.Errorf("no spiffe-oci-refresher has served this node since %s (%s ago; refresher_grace %s): %s",
			last.UTC().Format(time.RFC3339), now.Sub(last).Round(time.Second), h.Config.RefresherGrace, refresherHint)
	}
	return nil
}

// Poststop forgets container id: its record and files.
func (h *Hook) Poststop(id string) error {
	return statedir.Store{Dir: h.Config.StateDir}.Remove(id)
}

// FailOpen leaves the trace of a container let start without its identity
// (failure_policy: fail-open) in the state directory, where the
// refresher's audit counts and reports it: the runtime drops a successful
// hook's output. Poststop removes it with the rest of the container's state.
func (h *Hook) FailOpen(state *specs.State, cause error) {
	f := statedir.FailOpen{ID: state.ID, PID: state.Pid, Error: cause.Error(), Time: time.Now().UTC()}
	if state.Pid > 0 {
		f.StartTime, _ = process.StartTime(state.Pid)
	}
	if err := (statedir.Store{Dir: h.Config.StateDir}).SaveFailOpen(f); err != nil {
		h.log().Warn("recording the fail-open start for the refresher's audit", logkey.Container, state.ID, logkey.Error, err)
	}
}

// log returns h.Log, or a logger that drops every line if there is none.
func (h *Hook) log() *slog.Logger {
	if h.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return h.Log
}
