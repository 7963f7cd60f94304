package refresh

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/metrics"
)

// agentConn is one agent admin socket: its gRPC connection, shared by all
// streams, and its one bundle stream, which also tells whether the agent
// is reachable. It logs reachability once per change, however many
// containers are waiting on it.
type agentConn struct {
	socket   string
	client   *agent.Client
	settings func() config.Refresher
	log      *slog.Logger

	mu        sync.Mutex
	bundles   *x509bundle.Set
	up        bool
	recovered chan struct{} // closed when the agent becomes reachable again
	ready     chan struct{} // closed when the first bundles arrive

	// jwtBundles is the latest answer of the JWT bundle stream, which
	// only opens once a container asks for JWT bundles (jwtOnce).
	jwtBundles agent.JWTBundles
	jwtOnce    sync.Once
}

func newAgentConn(ctx context.Context, socket string, settings func() config.Refresher, dial func(string, ...grpc.DialOption) (*agent.Client, error), log *slog.Logger) *agentConn {
	cfg := settings()
	a := &agentConn{
		socket:    socket,
		settings:  settings,
		log:       log.With("agent", socket),
		recovered: make(chan struct{}),
		ready:     make(chan struct{}),
		up:        true, // until shown otherwise, so the first failure is logged
	}
	// gRPC reconnects on its own schedule; bound it by the same backoff,
	// so that streams resume soon after the agent comes back. (Fixed for
	// the connection's life: a reload changes only the retry delays.)
	client, err := dial(socket, grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           backoff.Config{BaseDelay: cfg.BackoffMin, Multiplier: 1.6, Jitter: 0.2, MaxDelay: cfg.BackoffMax},
		MinConnectTimeout: 5 * time.Second,
	}))
	if err != nil {
		// Only a malformed target fails here; streams report it again.
		a.log.Error("creating agent client", logkey.Error, err)
	}
	a.client = client
	go func() { <-ctx.Done(); a.close() }()
	return a
}

func (a *agentConn) close() {
	if a.client != nil {
		a.client.Close()
	}
}

// run follows the agent's bundles until ctx ends, calling onBundles after
// each change.
func (a *agentConn) run(ctx context.Context, onBundles func(*agentConn)) {
	if a.client == nil {
		return
	}
	attempt := 0
	for ctx.Err() == nil {
		stream, err := a.client.SubscribeX509Bundles(ctx)
		for err == nil {
			var set *x509bundle.Set
			if set, err = stream.Recv(); err != nil {
				break
			}
			attempt = 0
			a.setBundles(set)
			a.setUp(true, nil)
			onBundles(a)
		}
		if ctx.Err() != nil {
			return
		}
		a.setUp(false, err)
		if !sleep(ctx, backoffDelay(a.settings(), attempt), nil) {
			return
		}
		attempt++
	}
}

func (a *agentConn) setBundles(set *x509bundle.Set) {
	a.mu.Lock()
	defer a.mu.Unlock()
	first := a.bundles == nil
	a.bundles = set
	if first {
		close(a.ready)
	}
}

func (a *agentConn) setUp(up bool, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if up == a.up {
		return
	}
	a.up = up
	if up {
		a.log.Info("agent reachable again; resuming every stream")
		close(a.recovered)
		a.recovered = make(chan struct{})
		return
	}
	a.log.Warn("agent unreachable; containers keep their current files and streams retry with backoff", logkey.Error, err)
}

// reachable reports whether the agent answers now: it has sent bundles and
// no stream has failed since.
func (a *agentConn) reachable() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.up && a.bundles != nil
}

// Bundles returns the latest bundles, waiting for the first set.
func (a *agentConn) Bundles(ctx context.Context) (*x509bundle.Set, error) {
	select {
	case <-a.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.bundles, nil
}

// Recovered returns a channel closed when the agent next becomes reachable.
func (a *agentConn) Recovered() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.recovered
}

// backoffDelay is capped exponential backoff with full jitter in its upper half.
func backoffDelay(cfg config.Refresher, attempt int) time.Duration {
	d := cfg.BackoffMin
	for range attempt {
		d *= 2
		if d >= cfg.BackoffMax {
			d = cfg.BackoffMax
			break
		}
	}
	return d/2 + rand.N(d/2+1)
}

// sleep waits d, or until wake is closed; it returns false if ctx ended.
func sleep(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-wake:
		// Spread the herd of streams that all wake at once.
		return sleep(ctx, rand.N(time.Second), nil)
	case <-ctx.Done():
	}
	return ctx.Err() == nil
}

// metricKind is errKind bounded to the metric's label values.
func metricKind(err error) string {
	switch {
	case errors.Is(err, agent.ErrUnavailable):
		return metrics.KindUnavailable
	case errors.Is(err, agent.ErrNotAuthorized):
		return metrics.KindNotAuthorized
	case errors.Is(err, agent.ErrNoIdentity):
		return metrics.KindNoIdentity
	}
	return metrics.KindOther
}

// errKind groups errors so that a container logs once per kind of trouble.
func errKind(err error) string {
	switch {
	case errors.Is(err, agent.ErrUnavailable):
		return "unavailable"
	case errors.Is(err, agent.ErrNotAuthorized):
		return "not-authorized"
	case errors.Is(err, agent.ErrNoIdentity):
		return "no-identity"
	case errors.Is(err, agent.ErrAttestationFailed):
		// Logged once, retried with backoff: a failed attestation of a
		// live process is the agent's trouble and may pass.
		return "attestation-failed"
	}
	return err.Error()
}
