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

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/mount"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/render"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/internal/userns"
)

// Hook holds what every stage needs.
type Hook struct {
	Config config.Config
	// Log receives lines worth an operator's attention that do not stop
	// the container (several SVIDs for one pid, fail-open); nil drops
	// them. spiffe-oci-hook's is NewLogger's.
	Log *slog.Logger
	// Writer writes the identity files.
	Writer files.Writer
	// Labeler returns the labeler for a container's SELinux mount label
	// (nil: none). It is the seam through which tests see every path.
	Labeler func(mountLabel string) files.Labeler
}

// Request is a container that asked for an identity.
type Request struct {
	State      *specs.State
	Spec       *specs.Spec
	Key        string // the annotation that asked
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
	req := &Request{State: state, Spec: spec, Key: key}
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

// AgentSocket returns the admin socket a request's deliveries will use: the
// node's, unless an annotation names another one the node allows.
func (h *Hook) AgentSocket(req *Request) (string, error) {
	socket := ""
	for i, d := range req.Deliveries {
		s := h.Config.NodeAgentSocket()
		if d.AgentAddress != "" {
			if !h.Config.AgentSocketAllowed(d.AgentAddress) {
				return "", fmt.Errorf("annotation %s: delivery %d: spire_agent_address %q is not allowed by the node configuration (allowed_agent_sockets); remove it to use the node's agent", req.Key, i, d.AgentAddress)
			}
			s = d.AgentAddress
		}
		if socket != "" && s != socket {
			return "", fmt.Errorf("annotation %s: deliveries name different agents (%s, %s); one container uses one agent", req.Key, socket, s)
		}
		socket = s
	}
	return socket, nil
}

// Create delivers the identity: it fetches the SVID for the container's
// pid, writes the files, mounts them at every cert_dir and records the
// container for the refresher. On error nothing is left in the state
// directory.
func (h *Hook) Create(ctx context.Context, req *Request) (err error) {
	id := req.State.ID
	socket, err := h.AgentSocket(req)
	if err != nil {
		return err
	}
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

	ctx, cancel := context.WithTimeout(ctx, h.Config.Timeout)
	defer cancel()
	client, err := h.client(socket)
	if err != nil {
		return err
	}
	defer client.Close()
	// JWT material, when asked for, in parallel with the X.509 exchange;
	// a container that asked for none starts nothing here.
	jwtCtx, jwtCancel := context.WithCancel(ctx)
	defer jwtCancel()
	jwtDone := h.fetchJWT(jwtCtx, client, proc.PID, req.Deliveries)
	// A new pod's entry may still be on its way to the agent: wait for it
	// on the open stream, within registration_wait.
	update, bundles, err := client.FetchX509(ctx, proc.PID, agent.Wait{For: h.Config.EntryWait(), Alive: proc.Alive})
	if err != nil {
		jwtCancel() // its answer would not be used
	}
	jwt, jwtErr := jwtDone()
	if err == nil && jwtErr != nil && agent.Retryable(jwtErr) {
		// Asked while the entry was still on its way (or the agent was
		// restarting): the X.509 wait has seen it clear up.
		jwt, jwtErr = h.fetchJWT(ctx, client, proc.PID, req.Deliveries)()
	}
	if err == nil && jwtErr != nil {
		err = jwtErr
	}
	if err != nil {
		if errors.Is(err, agent.ErrNoIdentity) {
			return fmt.Errorf("%w: create a registration entry whose selectors match pid %d as the agent sees it at container creation (with spire-controller-manager, a ClusterSPIFFEID that selects this pod), or raise registration_wait if entries reach the agent later",
				err, proc.PID)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%w (timeout %s: raise timeout in the node configuration, or check the agent's health)", err, h.Config.Timeout)
		}
		return err
	}
	// The agent attested whatever process had this pid when it looked.
	// Only if the pinned process is still alive now was that process ours.
	if err := proc.Alive(); err != nil {
		return fmt.Errorf("container process exited while its identity was fetched; nothing delivered: %w", err)
	}
	if len(update.SVIDs) > 1 {
		h.log().Warn(fmt.Sprintf("the agent returned %d SVIDs for pid %d (%s); delivering the first unless a delivery names spiffe_id. An entry whose only selector is unix:uid:0 matches every container at creation time.",
			len(update.SVIDs), proc.PID, agent.IDs(update.SVIDs)), logkey.Container, id)
	}

	if err := store.Init(); err != nil {
		return err
	}
	// The refresher may be cleaning up after an earlier instance under
	// this ID (podman restart): hold the container's lock from the first
	// file to the record, so it never removes what this delivery writes.
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
	if err := os.MkdirAll(store.ContainerDir(id), 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}

	rootfs := ocistate.RootfsPath(req.State.Bundle, req.Spec)
	rec := statedir.Record{
		ID:          id,
		PID:         proc.PID,
		StartTime:   proc.StartTime,
		Owner:       owner,
		AgentSocket: socket,
		Created:     time.Now().UTC(),
	}
	writer := h.Writer
	if req.Spec.Linux != nil {
		rec.MountLabel = req.Spec.Linux.MountLabel
	}
	if h.Labeler != nil && rec.MountLabel != "" {
		writer.Labeler = h.Labeler(rec.MountLabel)
	}
	rendered := make([][]files.File, len(req.Deliveries))
	var sizes []int
	var jwtBundles agent.JWTBundles
	if jwt != nil {
		jwtBundles = jwt.Bundles
	}
	for i, d := range req.Deliveries {
		svid, err := agent.Select(update.SVIDs, d.SPIFFEID)
		if err != nil {
			return fmt.Errorf("annotation %s: delivery %d: %w", req.Key, i, err)
		}
		rd := statedir.Delivery{Delivery: d, Delivered: svid.ID.String()}
		fs, err := render.Delivery(d, render.Input{SVID: svid, Bundles: bundles, FederatesWith: update.FederatesWith, JWT: jwt, JWTBundles: jwtBundles})
		// A JWT file's error does not say which delivery it is of.
		if jerr := (*render.JWTError)(nil); errors.As(err, &jerr) {
			return fmt.Errorf("annotation %s: delivery %d: %w", req.Key, i, err)
		}
		if err != nil {
			return err
		}
		for _, f := range fs {
			sizes = append(sizes, len(f.Data))
		}
		rendered[i] = fs
		rec.Deliveries = append(rec.Deliveries, rd)
	}
	if err := h.write(store, id, req.Key, statedir.Footprint(sizes), func() error {
		for i, fs := range rendered {
			if err := writer.Write(store.DeliveryDir(id, i), fs, owner); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	for i, d := range req.Deliveries {
		if err := mount.Bind(proc.FD(), rootfs, store.DeliveryDir(id, i), d.CertDir); err != nil {
			return fmt.Errorf("annotation %s: cert_dir %s: %w", req.Key, d.CertDir, err)
		}
	}
	return store.Save(rec)
}

// write runs write, which adds need bytes to the state directory, if the
// node's budget (state_budget_mib) has room for them. What the state
// directory holds is tmpfs pages charged to the refresher's memory, and
// a pod chooses how many deliveries it asks for: past the budget the
// refresher would outgrow its memory limit and stop rotating for every
// container on the node. The check and the write hold the node-wide
// budget lock, so that two hooks never both take the last room.
func (h *Hook) write(store statedir.Store, id, key string, need int64, write func() error) error {
	lock, err := store.LockBudget()
	if err != nil {
		return err
	}
	defer lock.Unlock()
	// What the containers reserved, or what the state directory's own
	// tmpfs holds if more (containers served before the budget reserved
	// nothing); a shared /run counts only the reservations.
	used, err := store.Reserved()
	if err != nil {
		return err
	}
	held, err := store.Used()
	if err != nil {
		return err
	}
	used = max(used, held)
	budget := int64(h.Config.StateBudgetMiB) << 20
	if used+need > budget {
		return fmt.Errorf("annotation %s: its files need %d KiB and the containers served from the state directory %s take %.1f MiB of the node's state_budget_mib %d: "+
			"refused, as the refresher's memory holds them; ask for fewer deliveries, run the pod on another node, "+
			"or raise state_budget_mib together with the refresher's memory limit (docs/configuration.md)",
			key, need>>10, store.Dir, float64(used)/(1<<20), h.Config.StateBudgetMiB)
	}
	if err := store.Reserve(id, need); err != nil {
		return err
	}
	return write()
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

// client returns a client of the node's agent API on socket. With the
// Broker API the hook presents the broker SVID the refresher keeps in the
// state directory: a file read, no call to the agent.
func (h *Hook) client(socket string) (*agent.Client, error) {
	if h.Config.AgentAPI != config.APIBroker {
		return agent.New(socket)
	}
	id, err := brokersvid.Load(brokersvid.Dir(h.Config.StateDir), time.Now())
	if err != nil {
		return nil, err
	}
	return agent.NewBroker(socket, id)
}

// fetchJWT starts fetching the JWT material the deliveries ask for and
// returns the function that waits for it.
func (h *Hook) fetchJWT(ctx context.Context, client *agent.Client, pid int, ds []annotations.Delivery) func() (*agent.JWT, error) {
	auds, wantBundles := annotations.JWTRequests(ds)
	if len(auds) == 0 && !wantBundles {
		return func() (*agent.JWT, error) { return nil, nil }
	}
	type result struct {
		jwt *agent.JWT
		err error
	}
	done := make(chan result, 1)
	go func() {
		jwt, err := client.FetchJWT(ctx, pid, agent.JWTRequest{Audiences: auds, Bundles: wantBundles})
		done <- result{jwt, err}
	}()
	return func() (*agent.JWT, error) {
		r := <-done
		return r.jwt, r.err
	}
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
