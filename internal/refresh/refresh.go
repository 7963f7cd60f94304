// Package refresh is spiffe-oci-refresher's engine: it keeps every
// container the hook served supplied with fresh SVIDs and bundles for as
// long as the container lives, and forgets it when it exits.
//
// The state directory is its only memory (package statedir): at start it
// scans the records, then follows them with inotify and a periodic rescan,
// so it survives its own restarts and never needs the hook to reach it.
// For each agent socket it holds one bundle stream; for each container a
// pidfd and one SVID stream by pid. Every update is written through the
// one atomic writer (package files).
package refresh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/audit"
	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/metrics"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
)

// orphanAge is how old a container directory without a record must be
// before a rescan removes it: younger ones may belong to a hook that is
// still delivering (its record is written last).
const orphanAge = 2 * time.Minute

// Refresher keeps the containers of one state directory fresh.
type Refresher struct {
	cfg   config.Config
	store statedir.Store
	log   *slog.Logger
	// Writer writes every generation; tests and SELinux set its Labeler.
	Writer files.Writer
	// Labeler returns the labeler for a container's mount label (nil: none).
	Labeler func(mountLabel string) files.Labeler
	// Metrics are the refresher's counters; its gauges read Report.
	Metrics *metrics.Metrics
	// Version is reported in Report.
	Version string

	// beatFailed: the last heartbeat failed (and was logged). Run's
	// goroutine only.
	beatFailed bool
	// live is the configuration in force: Reload replaces it.
	live     atomic.Pointer[config.Config]
	reloaded chan struct{}
	scanned  atomic.Bool

	// audit is the last audit of the node's containers (audit.go);
	// auditReloaded tells the audit loop its interval may have changed.
	audit         atomic.Pointer[audit.Result]
	auditReloaded chan struct{}

	// writeSlots bounds how many containers render and write at once: a
	// bundle change or an agent restart rotates every container together,
	// and with a thousand of them unbounded work only raises peak memory
	// on a node with a few cores.
	writeSlots chan struct{}

	// hooks are the test seams; New sets them to no-ops.
	hooks hooks
	// exits watches the containers' processes for their exit (exits.go):
	// started with the first container, closed when Run returns.
	exitsMu sync.Mutex
	exits   *exits
	// brokerID is the broker SVID (agent_api broker; followBrokerSVID).
	brokerID *brokersvid.Holder

	mu         sync.Mutex
	containers map[string]*container
	agents     map[string]*agentConn
	wg         sync.WaitGroup
}

// hooks are the points at which a test waits for the refresher's work or
// holds it back. They are fields of the Refresher rather than package
// variables, so that tests each with a refresher of their own can run in
// parallel. (The exit watcher's own seam, for the tests that drive it
// without a refresher, is newExits' onZombie.) New sets every one to a no-op, so the refresher calls them
// without a nil check; a test replaces those it needs before Run.
type hooks struct {
	// scanned runs after each scan: a test that checks that rescans
	// change nothing waits for some to have happened.
	scanned func()
	// writePass runs after each write pass of a container, with the SVIDs
	// it worked from: a test that checks what a pass did not do waits for
	// the pass.
	writePass func(id string, svids *agent.X509SVIDs)
	// exited runs after a container's process exited and before the
	// refresher acts on it: it can hold the exit notice back until a new
	// instance under the same ID is recorded.
	exited func(id string)
	// settled runs after the refresher checked a handed-over container
	// once its hook let go of it, with whether it removed files.
	settled func(id string, removed bool)
}

// noHooks are the hooks of a refresher that no test watches.
func noHooks() hooks {
	return hooks{
		scanned:   func() {},
		writePass: func(string, *agent.X509SVIDs) {},
		exited:    func(string) {},
		settled:   func(string, bool) {},
	}
}

// New returns a refresher for cfg.
func New(cfg config.Config, log *slog.Logger) *Refresher {
	r := &Refresher{
		hooks:      noHooks(),
		cfg:        cfg,
		store:      statedir.Store{Dir: cfg.StateDir},
		log:        log,
		containers: map[string]*container{},
		agents:     map[string]*agentConn{},
		writeSlots: make(chan struct{}, 2*runtime.GOMAXPROCS(0)),
		reloaded:   make(chan struct{}, 1),
		brokerID:   &brokersvid.Holder{},
	}
	r.auditReloaded = make(chan struct{}, 1)
	r.live.Store(&cfg)
	r.Metrics = metrics.New(r.Report)
	return r
}

// settings returns the refresher settings in force.
func (r *Refresher) settings() config.Refresher { return r.live.Load().Refresher }

// heartbeat marks the state directory as served now; a failure is logged
// once until a heartbeat succeeds again (with require_refresher, the hook
// then refuses containers once refresher_grace has passed).
func (r *Refresher) heartbeat() {
	err := r.store.Heartbeat(time.Now())
	if err != nil && !r.beatFailed {
		r.log.Error("heartbeat failed: with require_refresher, the hook will refuse new containers", logkey.Error, err)
	}
	r.beatFailed = err != nil
}

// Reload puts cfg in force without touching any stream or file: backoff
// applies from the next retry, the rescan interval at once, and a new
// agent_admin_socket becomes the agent /readyz checks (containers keep the
// agent their record names). Settings the refresher cannot change while
// it runs (config.RestartOnly) make it refuse the whole of cfg.
func (r *Refresher) Reload(cfg config.Config) error {
	if err := config.RestartOnly(*r.live.Load(), cfg); err != nil {
		return err
	}
	r.live.Store(&cfg)
	select {
	case r.reloaded <- struct{}{}:
	default:
	}
	return nil
}

// Run scans the state directory, calls ready once the containers found
// are being served, and keeps going until ctx ends. Then it closes every
// stream and returns; the files stay, so containers keep valid identities
// until the next start.
func (r *Refresher) Run(ctx context.Context, ready func()) error {
	if err := r.store.Init(); err != nil {
		return err
	}
	watcher, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watching %s: %w", r.store.RecordsDir(), err)
	}
	defer watcher.Close()
	// Watch before the first scan, so that no record written in between
	// is missed.
	if err := watcher.Add(r.store.RecordsDir()); err != nil {
		return fmt.Errorf("watching %s: %w", r.store.RecordsDir(), err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer func() {
		cancel()
		r.wg.Wait()
		r.closeExits()
	}()
	if r.cfg.AgentAPI == config.APIBroker {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.followBrokerSVID(ctx)
		}()
	}
	// The node's agent is followed even with no container to serve, so
	// that /readyz and spiffe_oci_agent_up tell whether it answers.
	r.agent(ctx, r.live.Load().NodeAgentSocket())
	r.scan(ctx)
	r.scanned.Store(true)
	r.log.Info("ready", logkey.StateDir, r.cfg.StateDir, logkey.Containers, r.Count())
	// From here on the node is served: the heartbeat tells the hook so
	// (require_refresher). The last one is written at the stop, so that
	// refresher_grace counts from then.
	r.heartbeat()
	// The hook hands containers over from here on.
	if ln := r.listenHandoff(); ln != nil {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.serveHandoff(ctx, ln)
		}()
	}
	if ready != nil {
		ready()
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.runAudits(ctx)
	}()

	rescan := time.NewTicker(r.settings().RescanInterval)
	defer rescan.Stop()
	beat := time.NewTicker(r.live.Load().HeartbeatInterval())
	defer beat.Stop()
	for {
		select {
		case <-r.reloaded:
			rescan.Reset(r.settings().RescanInterval)
			beat.Reset(r.live.Load().HeartbeatInterval())
			select {
			case r.auditReloaded <- struct{}{}:
			default:
			}
			r.agent(ctx, r.live.Load().NodeAgentSocket())
		case <-beat.C:
			r.heartbeat()
		case <-ctx.Done():
			r.heartbeat()
			r.log.Info("stopping", logkey.Containers, r.Count())
			return nil
		case ev, ok := <-watcher.Events:
			if !ok {
				return errors.New("inotify watcher closed")
			}
			id, ok := statedir.IDFromFileName(filepath.Base(ev.Name))
			if !ok {
				continue
			}
			if ev.Has(fsnotify.Create) || ev.Has(fsnotify.Write) {
				r.add(ctx, id)
			}
			if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
				if _, err := os.Lstat(r.store.RecordPath(id)); errors.Is(err, os.ErrNotExist) {
					r.forget(id, "record removed (poststop)")
				}
			}
		case err, ok := <-watcher.Errors:
			if !ok {
				return errors.New("inotify watcher closed")
			}
			// An overflow loses events; the rescan catches up.
			r.log.Warn("inotify", logkey.Error, err)
			r.scan(ctx)
		case <-rescan.C:
			r.scan(ctx)
		}
	}
}

// Count returns the number of containers being served.
func (r *Refresher) Count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.containers)
}

// scan reconciles the served containers with the records on disk.
func (r *Refresher) scan(ctx context.Context) {
	defer r.hooks.scanned()
	ids, err := r.store.IDs()
	if err != nil {
		r.log.Error("scanning state directory", logkey.Error, err)
		return
	}
	onDisk := map[string]bool{}
	for _, id := range ids {
		onDisk[id] = true
		r.add(ctx, id)
	}
	r.mu.Lock()
	var gone []string
	for id := range r.containers {
		if !onDisk[id] {
			gone = append(gone, id)
		}
	}
	r.mu.Unlock()
	for _, id := range gone {
		r.forget(id, "record removed (poststop)")
	}
	r.pruneFailOpen()
	orphans, err := r.store.Orphans()
	if err != nil {
		r.log.Error("scanning state directory", logkey.Error, err)
		return
	}
	for _, id := range orphans {
		st, err := os.Lstat(r.store.ContainerDir(id))
		if err != nil || time.Since(st.ModTime()) < orphanAge {
			continue
		}
		// The directory may be an old instance's that a hook is
		// delivering to again under the same ID: RemoveOrphan checks for
		// a record under the container's lock.
		removed, err := r.store.RemoveOrphan(id)
		if err != nil {
			r.log.Error("removing orphaned container directory", logkey.Container, id, logkey.Error, err)
			continue
		}
		if removed {
			r.log.Info("removed orphaned container directory", logkey.Container, id)
		}
	}
}

// add starts serving container id's recorded instance unless it is served
// already. A record naming another instance than the one served (the ID
// was reused: podman restart, --restart=always) replaces it: the old
// instance is stopped without touching the state, which is the new
// instance's now. A recorded instance whose process is gone (it exited
// while the refresher was down, or its pid now names another process) has
// its state removed.
func (r *Refresher) add(ctx context.Context, id string) {
	rec, err := r.store.Load(id)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			r.log.Error("reading record", logkey.Container, id, logkey.Error, err)
		}
		return
	}
	r.mu.Lock()
	old, served := r.containers[id]
	r.mu.Unlock()
	if served && old.sameInstance(rec) {
		return
	}
	proc, err := process.OpenRecorded(rec.PID, rec.StartTime)
	if err != nil {
		if errors.Is(err, process.ErrGone) {
			r.removeInstance(rec, "process exited while the refresher was away")
			return
		}
		r.log.Error("pinning container process", logkey.Container, id, logkey.PID, rec.PID, logkey.Error, err)
		return
	}
	if served {
		r.forgetInstance(old, "its ID now names a new instance (container restarted)")
	}
	a := r.agent(ctx, rec.AgentSocket)
	if wantsJWTBundles(rec) {
		r.followJWTBundles(ctx, a)
	}
	c := newContainer(ctx, r, rec, proc, a)

	r.mu.Lock()
	if _, dup := r.containers[id]; dup || ctx.Err() != nil {
		r.mu.Unlock()
		proc.Close()
		return
	}
	r.containers[id] = c
	r.mu.Unlock()

	r.log.Info("serving container", logkey.Container, id, logkey.PID, rec.PID, logkey.SPIFFEID, rec.Deliveries[0].Delivered, "deliveries", len(rec.Deliveries))
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		if exited := c.run(); exited {
			r.hooks.exited(id)
			r.forgetInstance(c, "container process exited")
			r.removeInstance(c.rec, "container process exited")
		}
	}()
}

// forget stops serving container id, whichever instance is served: its
// record is gone (poststop removed it with the files).
func (r *Refresher) forget(id, why string) {
	r.mu.Lock()
	c, ok := r.containers[id]
	delete(r.containers, id)
	r.mu.Unlock()
	if ok {
		c.stop()
		r.log.Info("forgot container", logkey.Container, id, logkey.Reason, why)
	}
}

// forgetInstance stops serving c if it is still the instance served under
// its ID; a newer instance under the same ID stays served.
func (r *Refresher) forgetInstance(c *container, why string) {
	r.mu.Lock()
	cur, ok := r.containers[c.rec.ID]
	if ok && cur == c {
		delete(r.containers, c.rec.ID)
	}
	r.mu.Unlock()
	if ok && cur == c {
		c.stop()
		r.log.Info("forgot container", logkey.Container, c.rec.ID, logkey.PID, c.rec.PID, logkey.Reason, why)
	}
}

// removeInstance deletes the state of the instance rec names, unless the
// ID's record names another instance by now (statedir.RemoveInstance).
func (r *Refresher) removeInstance(rec statedir.Record, why string) {
	removed, err := r.store.RemoveInstance(rec.ID, rec.PID, rec.StartTime)
	if err != nil {
		r.log.Error("removing container state", logkey.Container, rec.ID, logkey.Error, err)
		return
	}
	if !removed {
		r.log.Info("kept container state: its ID names a new instance", logkey.Container, rec.ID, "exited_pid", rec.PID)
		return
	}
	r.log.Info("removed container state", logkey.Container, rec.ID, logkey.PID, rec.PID, logkey.Reason, why)
}

// agent returns the connection to socket, creating it on first use.
func (r *Refresher) agent(ctx context.Context, socket string) *agentConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	a, ok := r.agents[socket]
	if !ok {
		a = newAgentConn(ctx, socket, r.settings, r.dial, r.log)
		r.agents[socket] = a
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			if r.cfg.AgentAPI == config.APIBroker {
				// Without the broker SVID every call fails at the TLS
				// handshake: that is not the agent being unreachable.
				select {
				case <-r.brokerID.Ready():
				case <-ctx.Done():
					return
				}
			}
			a.run(ctx, r.broadcastBundles)
		}()
	}
	return a
}

// followJWTBundles opens agent a's one JWT bundle stream, if not yet open.
func (r *Refresher) followJWTBundles(ctx context.Context, a *agentConn) {
	a.jwtOnce.Do(func() {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			a.runJWTBundles(ctx, r.broadcastJWTBundles)
		}()
	})
}

// broadcastJWTBundles tells the containers of agent a that write JWT
// bundles that they changed.
func (r *Refresher) broadcastJWTBundles(a *agentConn) {
	r.rewrite(func(c *container) bool { return c.agent == a && wantsJWTBundles(c.rec) })
}

// broadcastBundles tells every container of agent a that its bundles changed.
func (r *Refresher) broadcastBundles(a *agentConn) {
	r.rewrite(func(c *container) bool { return c.agent == a })
}

// rewrite runs a write pass for every served container that match
// accepts, in the background and a few at a time: a bundle change
// reaches every container at once, and a goroutine each would cost a
// thousand stacks at once. A container whose pass is still queued from
// an earlier change is not queued again: its pass reads the newest
// bundles.
func (r *Refresher) rewrite(match func(*container) bool) {
	var queue []*container
	r.mu.Lock()
	for _, c := range r.containers {
		if match(c) && !c.queued.Swap(true) {
			queue = append(queue, c)
		}
	}
	r.mu.Unlock()
	if len(queue) == 0 {
		return
	}
	work := make(chan *container)
	workers := min(cap(r.writeSlots), len(queue))
	r.wg.Add(workers + 1)
	for range workers {
		go func() {
			defer r.wg.Done()
			for c := range work {
				c.queued.Store(false)
				c.update(nil)
			}
		}()
	}
	go func() {
		defer r.wg.Done()
		for _, c := range queue {
			work <- c
		}
		close(work)
	}()
}

// Report returns what the refresher serves now: the agents in use (the
// node's, and those containers' records name) and every served container.
func (r *Refresher) Report() status.Report {
	node := r.live.Load().NodeAgentSocket()
	r.mu.Lock()
	cs := make([]*container, 0, len(r.containers))
	used := map[*agentConn]bool{}
	for _, c := range r.containers {
		cs = append(cs, c)
		used[c.agent] = true
	}
	var agents []*agentConn
	for socket, a := range r.agents {
		if socket == node || used[a] {
			agents = append(agents, a)
		}
	}
	r.mu.Unlock()

	rep := status.Report{Version: r.Version, Scanned: r.scanned.Load()}
	if a := r.audit.Load(); a != nil {
		rep.Audit = *a
	}
	for _, a := range agents {
		rep.Agents = append(rep.Agents, status.Agent{Socket: a.socket, Reachable: a.reachable()})
	}
	slices.SortFunc(rep.Agents, func(a, b status.Agent) int { return strings.Compare(a.Socket, b.Socket) })
	for _, c := range cs {
		rep.Containers = append(rep.Containers, c.status())
	}
	slices.SortFunc(rep.Containers, func(a, b status.Container) int { return strings.Compare(a.ID, b.ID) })
	return rep
}
