package refresh

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/render"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// container is one served container. One goroutine serves it: run, which
// holds its SVID stream open and writes each update. Bundle changes, JWT
// renewals and write retries run a write pass of their own; writeMu makes
// the passes one at a time.
type container struct {
	r     *Refresher
	rec   statedir.Record
	proc  *process.Process
	agent *agentConn

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	// exited: the exit watcher saw the process exit and be reaped.
	exited atomic.Bool
	// queued: a bundle change's write pass is waiting (Refresher.rewrite).
	queued atomic.Bool

	writeMu sync.Mutex
	// Owned by whoever holds writeMu.
	closed    bool // run ended: no more passes
	svids     *agent.X509SVIDs
	delivered []string // SPIFFE ID last written per delivery
	written   [][]byte // content last written per delivery
	writer    files.Writer
	// lastWriteErr is the kind of the last logged write error ("" when
	// writes work).
	lastWriteErr string
	// jwt is the latest answer to the container's JWT-SVID requests (nil
	// until the first, or when it asked for none).
	jwt *agent.JWT
	// A write that failed (a full state directory, say) is retried with
	// backoff: the agent sends the next SVID only at half its lifetime,
	// by when the files on disk may have expired.
	retry        *time.Timer
	retryAttempt int

	mu         sync.Mutex
	lastErr    string // kind of the last logged error, "" when healthy
	lastJWTErr string // the same for JWT-SVID renewal
	view       view   // for Report (status.go)
}

func newContainer(ctx context.Context, r *Refresher, rec statedir.Record, proc *process.Process, a *agentConn) *container {
	ctx, cancel := context.WithCancel(ctx)
	c := &container{
		r:         r,
		rec:       rec,
		proc:      proc,
		agent:     a,
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		delivered: make([]string, len(rec.Deliveries)),
		written:   make([][]byte, len(rec.Deliveries)),
		writer:    r.Writer,
	}
	for i, d := range rec.Deliveries {
		c.delivered[i] = d.Delivered
	}
	if r.Labeler != nil && rec.MountLabel != "" {
		c.writer.Labeler = r.Labeler(rec.MountLabel)
	}
	return c
}

// stop ends run and waits for it.
func (c *container) stop() {
	c.cancel()
	<-c.done
}

// run serves the container until its process exits (true) or it is
// stopped (false).
func (c *container) run() (exited bool) {
	ctx := c.ctx
	defer close(c.done)
	defer c.proc.Close()
	defer c.cancel()

	c.loadView()
	// The exit watcher ends the container's context, which ends its
	// stream: no goroutine of the container's waits for the exit.
	if err := c.r.onExit(ctx, c.proc, func() {
		c.exited.Store(true)
		c.cancel()
	}); err != nil {
		c.r.log.Error("watching container process", logkey.Container, c.rec.ID, logkey.Error, err)
		return false
	}
	// JWT-SVIDs do not stream: a goroutine renews them, only for a
	// container that asked for some.
	var jwts sync.WaitGroup
	if auds, _ := annotations.JWTRequests(recordDeliveries(c.rec)); len(auds) > 0 && c.agent.client != nil {
		jwts.Go(func() { c.renewJWT(ctx, auds) })
	}
	c.stream(ctx)

	// No pass may start, or still run, once run returns: the process's
	// pidfd closes with it.
	c.cancel()
	jwts.Wait()
	c.writeMu.Lock()
	c.closed = true
	if c.retry != nil {
		c.retry.Stop()
	}
	c.writeMu.Unlock()
	return c.exited.Load()
}

// update runs one write pass after change (if any) under writeMu. A
// failed write is retried with backoff, by a timer.
func (c *container) update(change func()) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if c.closed || c.ctx.Err() != nil {
		return
	}
	if change != nil {
		change()
	}
	if c.svids == nil {
		return // nothing to write before the first SVID
	}
	if c.writeOffStack(c.ctx) {
		c.retryAttempt = 0
		if c.retry != nil {
			c.retry.Stop()
		}
		return
	}
	d := backoffDelay(c.r.settings(), c.retryAttempt)
	c.retryAttempt++
	if c.retry == nil {
		c.retry = time.AfterFunc(d, func() { c.update(nil) })
	} else {
		c.retry.Reset(d)
	}
}

// stream follows the container's SVIDs, reopening the stream with backoff.
func (c *container) stream(ctx context.Context) {
	attempt := 0
	for ctx.Err() == nil {
		err := c.follow(ctx, func() { attempt = 0 })
		if ctx.Err() != nil {
			return
		}
		c.report(err)
		if !sleep(ctx, backoffDelay(c.r.settings(), attempt), c.agent.Recovered()) {
			return
		}
		attempt++
	}
}

// follow holds one SVID stream open and writes its updates.
func (c *container) follow(ctx context.Context, healthy func()) error {
	if c.agent.client == nil {
		return fmt.Errorf("agent %s: no client", c.agent.socket)
	}
	s, err := c.agent.client.SubscribeX509SVIDs(ctx, c.proc.PID)
	if err != nil {
		return err
	}
	open := false
	defer func() {
		if open {
			c.setStreamOpen(false)
		}
	}()
	for {
		u, err := s.Recv()
		if !open && (err == nil || errors.Is(err, agent.ErrNoIdentity)) {
			// The agent answered: the stream is open.
			open = true
			c.setStreamOpen(true)
			c.r.Metrics.StreamsOpened.Inc()
		}
		if errors.Is(err, agent.ErrNoIdentity) {
			// The stream stays open: an entry may match again later.
			// The files on disk stay valid until they expire.
			c.report(fmt.Errorf("%w: keeping the current files until an entry matches again", err))
			continue
		}
		if err != nil {
			return err
		}
		// The agent attested the pid when the stream opened. If the pinned
		// process is alive now, it was alive then, so the pid was still
		// ours: a reused pid never gets an identity written here.
		if err := c.proc.Alive(); err != nil {
			// Gone: the exit watcher forgets the container. Anything
			// else would stop its rotation silently: say so.
			if !errors.Is(err, process.ErrGone) {
				c.r.log.Error("checking container process; not writing its files", logkey.Container, c.rec.ID, logkey.Error, err)
			}
			<-ctx.Done()
			return ctx.Err()
		}
		healthy()
		// Any answer shows the agent is back: say so once and wake the
		// streams still waiting, without waiting for the bundle stream.
		c.agent.setUp(true, nil)
		c.report(nil)
		c.update(func() { c.svids = u })
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// report logs a container's trouble once per kind, and its recovery once.
// Agent-wide unavailability is the agent connection's to log.
func (c *container) report(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		if c.lastErr != "" && c.lastErr != "unavailable" {
			c.r.log.Info("container stream healthy again", logkey.Container, c.rec.ID)
		}
		c.lastErr = ""
		c.view.streamErr = ""
		return
	}
	c.r.Metrics.StreamErrors.WithLabelValues(metricKind(err)).Inc()
	c.view.streamErr = err.Error()
	kind := errKind(err)
	if kind == c.lastErr {
		return
	}
	c.lastErr = kind
	if kind == "unavailable" {
		return
	}
	c.r.log.Warn("container stream", logkey.Container, c.rec.ID, logkey.PID, c.proc.PID, logkey.Error, err)
}

// writeOffStack runs write on a goroutine of its own and waits for it.
// Rendering and writing a delivery (PEM, PKCS#8, the files) needs a deep
// stack; run's goroutine lives as long as the container and would keep
// that stack grown, a thousand containers a thousand times (stacks took
// 25.7 MiB at 1,000 containers, 20.0 MiB without). The short-lived
// goroutine's stack goes back to the runtime when it ends. The caller
// holds writeMu and waits, so write owns the container's state.
func (c *container) writeOffStack(ctx context.Context) bool {
	done := make(chan bool, 1)
	go func() { done <- c.write(ctx) }()
	return <-done
}

// write renders and writes every delivery whose content changed. It
// returns false if any delivery could not be written, so run retries.
func (c *container) write(ctx context.Context) (ok bool) {
	defer c.r.hooks.writePass(c.rec.ID, c.svids)
	// The Broker API's updates carry the container's own bundles; the
	// Delegated Identity API's come from the agent's one bundle stream.
	bundles := c.svids.Bundles
	if bundles == nil {
		var err error
		if bundles, err = c.agent.Bundles(ctx); err != nil {
			return true // stopping
		}
	}
	select {
	case c.r.writeSlots <- struct{}{}:
		defer func() { <-c.r.writeSlots }()
	case <-ctx.Done():
		return true
	}
	ok = true
	// clean: every delivery is as it should be. A delivery only a new
	// update can fix is not retried (ok stays true) but is not clean
	// either: its trouble stays reported until a write succeeds.
	clean := true
	var signals []string // renew_signal of each delivery rewritten
	defer func() { c.signal(signals) }()
	for i, d := range c.rec.Deliveries {
		svid, err := agent.Select(c.svids.SVIDs, d.SPIFFEID)
		if err != nil {
			// Only a new update can fix this one; no retry.
			c.reportWrite(fmt.Errorf("delivery %d (%s): %w; keeping the current files", i, d.CertDir, err), err.Error())
			clean = false
			continue
		}
		dir := c.r.store.DeliveryDir(c.rec.ID, i)
		fs, err := render.Delivery(d.Delivery, render.Input{
			SVID: svid, Bundles: bundles, FederatesWith: c.svids.FederatesWith,
			JWT: c.jwt, JWTBundles: c.agent.JWTBundles(), Current: generation(dir),
		})
		if jerr := (*render.JWTError)(nil); errors.As(err, &jerr) {
			// A new token or bundle brings the next try.
			c.reportWrite(fmt.Errorf("delivery %d (%s): %w; keeping the current files", i, d.CertDir, err), err.Error())
			clean = false
			continue
		}
		if err != nil {
			c.reportWrite(err, err.Error())
			clean = false
			continue
		}
		sum := fingerprint(fs)
		if bytes.Equal(sum, c.written[i]) || (c.written[i] == nil && onDisk(dir, fs)) {
			c.written[i] = sum
			c.noteDelivered(i, svid.ID.String(), svid.Certificates[0], false)
			continue
		}
		if err := c.writeLocked(dir, fs); err != nil {
			if errors.Is(err, errInstanceGone) {
				return true // the exit watcher forgets it
			}
			if _, statErr := os.Stat(c.r.store.RecordPath(c.rec.ID)); errors.Is(statErr, os.ErrNotExist) {
				return true // poststop removed the container meanwhile
			}
			c.r.Metrics.WriteFailures.Inc()
			// The kind is the errno, not the message, which names a new
			// generation directory every time.
			c.reportWrite(fmt.Errorf("writing %s: %w; keeping the current files and retrying", dir, err), errnoKind(err))
			ok, clean = false, false
			continue
		}
		c.written[i] = sum
		c.r.Metrics.Rotations.Inc()
		c.noteDelivered(i, svid.ID.String(), svid.Certificates[0], true)
		if d.RenewSignal != "" && !slices.Contains(signals, d.RenewSignal) {
			signals = append(signals, d.RenewSignal)
		}
		if id := svid.ID.String(); id != c.delivered[i] {
			c.r.log.Warn("container identity changed", logkey.Container, c.rec.ID, logkey.CertDir, d.CertDir, "was", c.delivered[i], "now", id)
			c.delivered[i] = id
		}
		c.r.log.Debug("rotated", logkey.Container, c.rec.ID, logkey.CertDir, d.CertDir, logkey.SPIFFEID, svid.ID.String(), logkey.Expires, svid.Certificates[0].NotAfter.Format(time.RFC3339))
	}
	if clean {
		c.reportWrite(nil, "")
	}
	return ok
}

// errInstanceGone: the container's process exited before its files were
// written; its ID may already name a new instance.
var errInstanceGone = errors.New("container process exited")

// writeLocked writes one delivery's files under the container's lock, and
// only while its process lives: once it exited, a new instance under the
// same ID (podman restart) may be writing the same directory, and an old
// instance's rotation must not overwrite the new one's files.
func (c *container) writeLocked(dir string, fs []files.File) error {
	l, err := c.r.store.Lock(c.rec.ID)
	if err != nil {
		return err
	}
	defer l.Unlock()
	if err := c.proc.Alive(); err != nil {
		return errInstanceGone
	}
	return c.writer.Write(dir, fs, c.rec.Owner)
}

// sameInstance reports whether rec names the instance c serves.
func (c *container) sameInstance(rec statedir.Record) bool {
	return c.rec.PID == rec.PID && c.rec.StartTime == rec.StartTime
}

// signal sends each renew_signal to the container's init process, through
// the pidfd that pins it: never to another process, whatever its number.
// The kernel drops a signal that a PID namespace's init has no handler
// for, but a process that is not its namespace's init (shared process
// namespace, host PID) dies of it, and so does an application behind an
// init wrapper that forwards it (tini, catatonit). Such a signal is not
// sent: the rotation stays, the reload does not happen, and the container
// reports why (process.SignalRisk).
func (c *container) signal(names []string) {
	if len(names) == 0 {
		return // nothing rewritten: the last verdict stands
	}
	var refused []string
	for _, name := range names {
		sig := unix.SignalNum(name)
		if sig == 0 {
			continue // the parser allows only names unix knows
		}
		risk, err := process.SignalRisk(c.proc.PID, sig)
		if err == nil && c.proc.Alive() != nil {
			return // exited: whatever was read belongs to no one now
		}
		if err != nil {
			risk = fmt.Sprintf("cannot tell whether %s would kill pid %d: %v", name, c.proc.PID, err)
		}
		if risk != "" {
			refused = append(refused, fmt.Sprintf("renew_signal %s not sent: %s; give the application a handler and run it as the container's init, or remove renew_signal", name, risk))
			continue
		}
		if err := c.proc.Signal(sig); err != nil {
			c.r.log.Warn("renew_signal", logkey.Container, c.rec.ID, logkey.Signal, name, logkey.Error, err)
			continue
		}
		c.r.log.Debug("sent renew_signal", logkey.Container, c.rec.ID, logkey.PID, c.proc.PID, logkey.Signal, name)
	}
	msg := strings.Join(refused, "; ")
	c.mu.Lock()
	changed := msg != c.view.signalErr
	c.view.signalErr = msg
	c.mu.Unlock()
	if changed && msg != "" {
		c.r.log.Warn("container files rotated without their reload signal", logkey.Container, c.rec.ID, logkey.Error, msg)
	}
}

// reportWrite logs trouble writing a container's files once per kind, and
// the recovery once. Stream health is reported separately (report).
func (c *container) reportWrite(err error, kind string) {
	if err == nil {
		if c.lastWriteErr != "" {
			c.r.log.Info("container files written again", logkey.Container, c.rec.ID)
			c.lastWriteErr = ""
			c.setWriteErr("")
		}
		return
	}
	c.setWriteErr(err.Error())
	if kind == c.lastWriteErr {
		return
	}
	c.lastWriteErr = kind
	c.r.log.Warn("container files", logkey.Container, c.rec.ID, logkey.Error, err)
}

// errnoKind names an error by its errno when it has one.
func errnoKind(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	return err.Error()
}

// fingerprint identifies what a delivery's files say: a hash, so that a
// thousand containers do not each keep a copy of their PEM. Every file
// counts, the key-holding ones too: a delivery may have no certificate
// file of its own (a credential bundle is its only copy of the chain).
func fingerprint(fs []files.File) []byte {
	h := sha256.New()
	for _, f := range fs {
		h.Write([]byte(f.Name))
		h.Write([]byte{0})
		h.Write(f.Data)
		h.Write([]byte{0})
	}
	return h.Sum(nil)
}

// onDisk reports whether dir already holds exactly fs, so that a restarted
// refresher does not rewrite every container at once.
func onDisk(dir string, fs []files.File) bool {
	names := make([]string, len(fs))
	for i, f := range fs {
		names[i] = f.Name
	}
	// A file the delivery no longer has (a federation that ended while
	// the refresher was down) must go, so the set must match too.
	if have, err := files.List(dir); err != nil || len(have) != len(names) {
		return false
	}
	cur, err := files.Read(dir, names...)
	if err != nil {
		return false
	}
	for _, f := range fs {
		if !bytes.Equal(cur[f.Name], f.Data) {
			return false
		}
	}
	return true
}
