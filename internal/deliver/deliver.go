// Package deliver is the delivery of a container's identity, short of the
// mount: ask the agent for the SVIDs of the container's pinned process,
// render each delivery's files and write them into the state directory
// within the node's state budget. The hook's direct path (a client of its
// own) and the refresher (its warm connection, for the hook that handed
// the request over, package handoff) both run it, so the files are the
// same whichever path served the container.
package deliver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/handoff"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/render"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// Agent is the agent connection a delivery asks, and what the caller
// already knows of it.
type Agent struct {
	Client *agent.Client
	// Bundles, when set, are the agent's current X.509 bundles (the
	// refresher follows them): the fetch then asks for the SVIDs only.
	Bundles *x509bundle.Set
	// Close, when set, closes a client made for this delivery alone.
	Close func() error
}

// Deliverer delivers under one node configuration.
type Deliverer struct {
	Config config.Config
	// Writer writes the identity files; Labeler returns the labeler for a
	// container's SELinux mount label (nil: none).
	Writer  files.Writer
	Labeler func(mountLabel string) files.Labeler
	// Log receives lines worth an operator's attention that do not stop
	// the container (several SVIDs for one pid); nil drops them.
	Log *slog.Logger
}

// agentSocket returns the admin socket a request's deliveries will use: the
// node's, unless an annotation names another one the node allows.
func agentSocket(cfg config.Config, key string, ds []annotations.Delivery) (string, error) {
	socket := ""
	for i, d := range ds {
		s := cfg.NodeAgentSocket()
		if d.AgentAddress != "" {
			if !cfg.AgentSocketAllowed(d.AgentAddress) {
				return "", fmt.Errorf("annotation %s: delivery %d: spire_agent_address %q is not allowed by the node configuration (allowed_agent_sockets); remove it to use the node's agent", key, i, d.AgentAddress)
			}
			s = d.AgentAddress
		}
		if socket != "" && s != socket {
			return "", fmt.Errorf("annotation %s: deliveries name different agents (%s, %s); one container uses one agent", key, socket, s)
		}
		socket = s
	}
	return socket, nil
}

// Deliver fetches the SVIDs of proc from the agent that connect returns
// for the request's socket, writes every delivery's files into the state
// directory and returns the container's record, which the caller saves
// once the files are mounted. The caller holds the container's lock, and
// removes what was written if Deliver or the mount fails.
func (d *Deliverer) Deliver(ctx context.Context, connect func(socket string) (Agent, error), proc *process.Process, req handoff.Request) (statedir.Record, error) {
	ds, err := req.Validate()
	if err != nil {
		return statedir.Record{}, err
	}
	socket, err := agentSocket(d.Config, req.Key, ds)
	if err != nil {
		return statedir.Record{}, err
	}
	a, err := connect(socket)
	if err != nil {
		return statedir.Record{}, err
	}
	if a.Close != nil {
		defer a.Close()
	}
	update, bundles, jwt, err := d.fetch(ctx, a, proc, ds)
	if err != nil {
		return statedir.Record{}, err
	}
	// The agent attested whatever process had this pid when it looked.
	// Only if the pinned process is still alive now was that process ours.
	if err := proc.Alive(); err != nil {
		return statedir.Record{}, fmt.Errorf("container process exited while its identity was fetched; nothing delivered: %w", err)
	}
	if len(update.SVIDs) > 1 {
		d.log().Warn(fmt.Sprintf("the agent returned %d SVIDs for pid %d (%s); delivering the first unless a delivery names spiffe_id. An entry whose only selector is unix:uid:0 matches every container at creation time.",
			len(update.SVIDs), proc.PID, agent.IDs(update.SVIDs)), logkey.Container, req.ID)
	}

	store := statedir.Store{Dir: d.Config.StateDir}
	if err := os.MkdirAll(store.ContainerDir(req.ID), 0o700); err != nil {
		return statedir.Record{}, fmt.Errorf("state directory: %w", err)
	}
	rec := statedir.Record{
		ID:          req.ID,
		PID:         proc.PID,
		StartTime:   proc.StartTime,
		Owner:       req.Owner,
		AgentSocket: socket,
		MountLabel:  req.MountLabel,
		Created:     time.Now().UTC(),
	}
	writer := d.Writer
	if d.Labeler != nil && rec.MountLabel != "" {
		writer.Labeler = d.Labeler(rec.MountLabel)
	}
	rendered := make([][]files.File, len(ds))
	var sizes []int
	var jwtBundles agent.JWTBundles
	if jwt != nil {
		jwtBundles = jwt.Bundles
	}
	for i, dl := range ds {
		svid, err := agent.Select(update.SVIDs, dl.SPIFFEID)
		if err != nil {
			return statedir.Record{}, fmt.Errorf("annotation %s: delivery %d: %w", req.Key, i, err)
		}
		fs, err := render.Delivery(dl, render.Input{SVID: svid, Bundles: bundles, FederatesWith: update.FederatesWith, JWT: jwt, JWTBundles: jwtBundles})
		// A JWT file's error does not say which delivery it is of.
		if jerr := (*render.JWTError)(nil); errors.As(err, &jerr) {
			return statedir.Record{}, fmt.Errorf("annotation %s: delivery %d: %w", req.Key, i, err)
		}
		if err != nil {
			return statedir.Record{}, err
		}
		for _, f := range fs {
			sizes = append(sizes, len(f.Data))
		}
		rendered[i] = fs
		rec.Deliveries = append(rec.Deliveries, statedir.Delivery{Delivery: dl, Delivered: svid.ID.String()})
	}
	err = d.withinBudget(store, req.ID, req.Key, statedir.Footprint(sizes), func() error {
		for i, fs := range rendered {
			if err := writer.Write(store.DeliveryDir(req.ID, i), fs, req.Owner); err != nil {
				return err
			}
		}
		return nil
	})
	return rec, err
}

// fetch asks the agent for the X.509 SVIDs (and bundles unless a knows
// them) and, when a delivery asks for any, the JWT material, in parallel.
func (d *Deliverer) fetch(ctx context.Context, a Agent, proc *process.Process, ds []annotations.Delivery) (*agent.X509SVIDs, *x509bundle.Set, *agent.JWT, error) {
	ctx, cancel := context.WithTimeout(ctx, d.Config.Timeout)
	defer cancel()
	// JWT material, when asked for, in parallel with the X.509 exchange;
	// a container that asked for none starts nothing here.
	jwtCtx, jwtCancel := context.WithCancel(ctx)
	defer jwtCancel()
	jwtDone := fetchJWT(jwtCtx, a.Client, proc.PID, ds)
	// A new pod's entry may still be on its way to the agent: wait for it
	// on the open stream, within registration_wait.
	wait := agent.Wait{For: d.Config.EntryWait(), Alive: proc.Alive, Bundles: a.Bundles}
	update, bundles, err := a.Client.FetchX509(ctx, proc.PID, wait)
	if err != nil {
		jwtCancel() // its answer would not be used
	}
	jwt, jwtErr := jwtDone()
	if err == nil && jwtErr != nil && agent.Retryable(jwtErr) {
		// Asked while the entry was still on its way (or the agent was
		// restarting): the X.509 wait has seen it clear up.
		jwt, jwtErr = fetchJWT(ctx, a.Client, proc.PID, ds)()
	}
	if err == nil && jwtErr != nil {
		err = jwtErr
	}
	if err != nil {
		if errors.Is(err, agent.ErrNoIdentity) {
			return nil, nil, nil, fmt.Errorf("%w: create a registration entry whose selectors match pid %d as the agent sees it at container creation (with spire-controller-manager, a ClusterSPIFFEID that selects this pod), or raise registration_wait if entries reach the agent later",
				err, proc.PID)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, nil, nil, fmt.Errorf("%w (timeout %s: raise timeout in the node configuration, or check the agent's health)", err, d.Config.Timeout)
		}
		return nil, nil, nil, err
	}
	return update, bundles, jwt, nil
}

// fetchJWT starts fetching the JWT material the deliveries ask for and
// returns the function that waits for it.
func fetchJWT(ctx context.Context, client *agent.Client, pid int, ds []annotations.Delivery) func() (*agent.JWT, error) {
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

// withinBudget runs write, which adds need bytes to the state directory,
// if the node's budget (state_budget_mib) has room for them. What the
// state directory holds is tmpfs pages charged to the refresher's memory,
// and a pod chooses how many deliveries it asks for: past the budget the
// refresher would outgrow its memory limit and stop rotating for every
// container on the node. The check and the write hold the node-wide
// budget lock, so that two deliveries never both take the last room.
func (d *Deliverer) withinBudget(store statedir.Store, id, key string, need int64, write func() error) error {
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
	budget := int64(d.Config.StateBudgetMiB) << 20
	if used+need > budget {
		return fmt.Errorf("annotation %s: its files need %d KiB and the containers served from the state directory %s take %.1f MiB of the node's state_budget_mib %d: "+
			"refused, as the refresher's memory holds them; ask for fewer deliveries, run the pod on another node, "+
			"or raise state_budget_mib together with the refresher's memory limit (docs/configuration.md)",
			key, need>>10, store.Dir, float64(used)/(1<<20), d.Config.StateBudgetMiB)
	}
	if err := store.Reserve(id, need); err != nil {
		return err
	}
	return write()
}

// log returns d.Log, or a logger that drops every line if there is none.
func (d *Deliverer) log() *slog.Logger {
	if d.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return d.Log
}
