// Package agent is the one client of the SPIRE agent used by both the hook
// and the refresher. It speaks either of the agent's two APIs that hand out
// another process's identity, chosen by the node configuration:
//
//   - the Delegated Identity API (SPIRE's own, on the admin socket; the
//     agent authorizes the caller by attesting its pid), and
//   - the SPIFFE Broker API (the standard, SPIRE's experimental.broker
//     endpoint from 1.15.2; the agent authorizes the caller by mutual TLS
//     with the broker's own X.509-SVID).
//
// Both sit behind one Client (and the unexported api interface): callers
// ask for a pid's SVIDs, bundles and JWT-SVIDs the same way, and get
// go-spiffe values that were parsed and checked (leaf is an SVID, key
// matches, chain is well formed), whichever API answered.
package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
)

// ErrNoIdentity means the agent answered but no registration entry matched
// the pid (the Broker API's WORKLOAD_NOT_ENTITLED).
var ErrNoIdentity = errors.New("no registration entry matches the container's process")

// Errors callers may want to tell apart.
var (
	ErrUnavailable   = errors.New("agent unavailable")
	ErrNotAuthorized = errors.New("caller is not an authorized delegate")
	// ErrAttestationFailed: the agent could not attest the pid (its process
	// is gone, or a workload attestor failed). SPIRE answers it with
	// Unavailable "workload attestation failed" from 1.15.2, and the Broker
	// API with WORKLOAD_NOT_FOUND. Worth a retry while the process lives.
	ErrAttestationFailed = errors.New("the agent could not attest the container's process")
	// ErrReferenceInvalid: the Broker API refused the workload reference
	// (WORKLOAD_REFERENCE_INVALID): a bug here or a type the agent does
	// not allow, never the container's doing.
	ErrReferenceInvalid = errors.New("the agent refused the workload reference")
)

// api is one of the agent's two APIs, as the Client uses it. Each call
// returns the answer as it came (raw DER, raw tokens); Client parses and
// checks it the same way for both.
type api interface {
	// subscribeX509SVIDs opens the pid's SVID stream.
	subscribeX509SVIDs(ctx context.Context, pid int) (func() (*rawX509, error), error)
	// subscribeX509Bundles opens a stream of every trust domain's X.509
	// bundle; pid is the workload the Broker API asks it for.
	subscribeX509Bundles(ctx context.Context, pid int) (func() (map[string][]byte, error), error)
	// fetchJWTSVIDs asks for the pid's JWT-SVIDs for audience.
	fetchJWTSVIDs(ctx context.Context, pid int, audience []string) ([]rawJWT, error)
	// subscribeJWTBundles opens a stream of every trust domain's JWKS.
	subscribeJWTBundles(ctx context.Context, pid int) (func() (map[string][]byte, error), error)
	// explain turns an error of a call about pid (0: none) into one that
	// says what the operator should do, wrapping the errors above.
	explain(err error, pid int) error
}

// rawX509 is one SVID update as the API sent it.
type rawX509 struct {
	svids []rawSVID
	// federatesWith names foreign trust domains (SPIFFE IDs or names).
	federatesWith []string
	// bundles, when not nil, are the bundles the update itself carries
	// (Broker API): keyed by trust domain, raw DER.
	bundles map[string][]byte
}

type rawSVID struct {
	chain []byte // DER, leaf first
	key   []byte // PKCS#8 DER
	hint  string
}

// rawJWT is one JWT-SVID as the API sent it.
type rawJWT struct {
	id       string // SPIFFE ID
	token    string
	issuedAt int64 // unix seconds; 0 if the API does not say
}

// recvEach adapts a stream of either API to the function the client
// reads it through: the next response, converted.
func recvEach[R, T any](s interface{ Recv() (R, error) }, convert func(R) (T, error)) func() (T, error) {
	return func() (T, error) {
		resp, err := s.Recv()
		if err != nil {
			var zero T
			return zero, err
		}
		return convert(resp)
	}
}

// nextBundles is recvEach for a bundle stream: the next response's
// bundles, keyed by trust domain.
func nextBundles[R any](s interface{ Recv() (R, error) }, bundles func(R) map[string][]byte) func() (map[string][]byte, error) {
	return recvEach(s, func(resp R) (map[string][]byte, error) { return bundles(resp), nil })
}

// Client talks to one agent socket through one of its APIs.
type Client struct {
	socket string
	conn   *grpc.ClientConn
	api    api
	// bundlesInUpdates: the API's SVID updates carry the bundles the
	// workload trusts (Broker API), so FetchX509 needs no bundle stream.
	bundlesInUpdates bool
}

// Socket returns the agent socket path.
func (c *Client) Socket() string { return c.socket }

// Close closes the connection and every stream on it.
func (c *Client) Close() error { return c.conn.Close() }

// X509SVIDs is one update of a process's X.509 SVIDs.
type X509SVIDs struct {
	// SVIDs in the agent's order; the first is the default.
	SVIDs []*x509svid.SVID
	// FederatesWith names the foreign trust domains whose bundles the
	// SVIDs' holder should trust.
	FederatesWith []spiffeid.TrustDomain
	// Bundles, when not nil, are the bundles that came with this update
	// (Broker API: the SVIDs' own trust domain and the federated ones, for
	// this workload only). Nil: use the agent's bundle stream.
	Bundles *x509bundle.Set
}

// SVIDStream receives X.509 SVID updates for one pid.
type SVIDStream struct {
	pid  int
	c    *Client
	recv func() (*rawX509, error)
}

// SubscribeX509SVIDs opens a stream of X.509 SVIDs for the process pid.
// The agent attests pid once, when the stream opens; keeping pid's process
// the same one (pidfd) and closing the stream are the caller's job.
func (c *Client) SubscribeX509SVIDs(ctx context.Context, pid int) (*SVIDStream, error) {
	recv, err := c.api.subscribeX509SVIDs(ctx, pid)
	if err != nil {
		return nil, c.api.explain(err, pid)
	}
	return &SVIDStream{pid: pid, c: c, recv: recv}, nil
}

// Recv waits for the next update. An update with no SVID is ErrNoIdentity:
// no entry matches the pid yet, and the stream stays open.
func (s *SVIDStream) Recv() (*X509SVIDs, error) {
	raw, err := s.recv()
	if err != nil {
		return nil, s.c.api.explain(err, s.pid)
	}
	return s.c.parseX509(raw, s.pid)
}

func (c *Client) parseX509(raw *rawX509, pid int) (*X509SVIDs, error) {
	if len(raw.svids) == 0 {
		return nil, fmt.Errorf("agent %s: pid %d: %w", c.socket, pid, ErrNoIdentity)
	}
	out := &X509SVIDs{}
	for i, sv := range raw.svids {
		if len(sv.chain) == 0 {
			return nil, fmt.Errorf("agent %s: SVID %d for pid %d is empty", c.socket, i, pid)
		}
		svid, err := x509svid.ParseRaw(sv.chain, sv.key)
		if err != nil {
			return nil, fmt.Errorf("agent %s: SVID %d for pid %d: %w", c.socket, i, pid, err)
		}
		svid.Hint = sv.hint
		out.SVIDs = append(out.SVIDs, svid)
	}
	for _, td := range raw.federatesWith {
		t, err := spiffeid.TrustDomainFromString(td)
		if err != nil {
			return nil, fmt.Errorf("agent %s: federated trust domain %q: %w", c.socket, td, err)
		}
		out.FederatesWith = append(out.FederatesWith, t)
	}
	if raw.bundles != nil {
		set, err := c.parseBundles(raw.bundles)
		if err != nil {
			return nil, err
		}
		out.Bundles = set
	}
	return out, nil
}

// BundleStream receives X.509 bundle updates: every trust domain the agent
// knows, its own and federated ones.
type BundleStream struct {
	c    *Client
	recv func() (map[string][]byte, error)
}

// SubscribeX509Bundles opens the stream of X.509 bundles. The Broker API
// asks for them on behalf of a workload: this process (the refresher, the
// broker) is that workload; the agent's answer does not depend on it.
func (c *Client) SubscribeX509Bundles(ctx context.Context) (*BundleStream, error) {
	return c.subscribeX509Bundles(ctx, selfPID())
}

func (c *Client) subscribeX509Bundles(ctx context.Context, pid int) (*BundleStream, error) {
	recv, err := c.api.subscribeX509Bundles(ctx, pid)
	if err != nil {
		return nil, c.api.explain(err, 0)
	}
	return &BundleStream{c: c, recv: recv}, nil
}

// Recv waits for the next set of bundles.
func (s *BundleStream) Recv() (*x509bundle.Set, error) {
	raw, err := s.recv()
	if err != nil {
		return nil, s.c.api.explain(err, 0)
	}
	return s.c.parseBundles(raw)
}

func (c *Client) parseBundles(raw map[string][]byte) (*x509bundle.Set, error) {
	set := x509bundle.NewSet()
	for id, der := range raw {
		td, err := spiffeid.TrustDomainFromString(id)
		if err != nil {
			return nil, fmt.Errorf("agent %s: bundle trust domain %q: %w", c.socket, id, err)
		}
		b, err := x509bundle.ParseRaw(td, der)
		if err != nil {
			return nil, fmt.Errorf("agent %s: bundle of %s: %w", c.socket, td, err)
		}
		set.Add(b)
	}
	return set, nil
}

// Wait says how long FetchX509 waits for an identity that is on its way.
//
// A new workload's registration entry reaches the agent seconds after the
// workload exists: spire-controller-manager writes a pod's entry once the
// pod is scheduled, the server's entry cache reloads every 5 s and the
// agent syncs every 5 s. Meanwhile the agent answers the pid with an update
// that holds no SVID and keeps the stream open; the SVID follows on the
// same stream once the entry syncs.
type Wait struct {
	// For bounds the wait, counted from the call: empty updates, and an
	// agent that is unavailable (restarting) or could not attest the pid,
	// are retried until then. Zero: the first answer decides.
	For time.Duration
	// Alive, when set, reports whether the pid's process still lives: an
	// attestation that failed because it exited is not retried.
	Alive func() error
	// Bundles, when set, are the agent's current X.509 bundles, which the
	// caller follows on a stream of its own (the refresher): the fetch then
	// asks for the SVIDs alone, and the Delegated Identity API attests the
	// caller once instead of twice.
	Bundles *x509bundle.Set
}

// ErrWaited wraps the last error once a Wait has run out, so that the
// message says how long the identity was waited for (Wait.For).
type ErrWaited struct {
	Waited time.Duration
	Err    error
}

func (e *ErrWaited) Error() string {
	if errors.Is(e.Err, ErrNoIdentity) {
		return fmt.Sprintf("waited %s for a registration entry: %v", e.Waited.Round(100*time.Millisecond), e.Err)
	}
	return fmt.Sprintf("retried for %s: %v", e.Waited.Round(100*time.Millisecond), e.Err)
}

func (e *ErrWaited) Unwrap() error { return e.Err }

// Retryable reports whether err may clear up within a wait: no entry yet,
// the agent restarting, or an attestation that failed while the process
// lives (the kubelet may not list a new pod yet).
func Retryable(err error) bool {
	return errors.Is(err, ErrNoIdentity) || errors.Is(err, ErrUnavailable) || errors.Is(err, ErrAttestationFailed)
}

// Backoff between attempts within a wait.
const (
	retryMin = 100 * time.Millisecond
	retryMax = time.Second
)

// FetchX509 returns the first SVID update for pid that holds an SVID, and
// the bundles its holder trusts. With the Delegated Identity API it asks
// for both at once; the Broker API's update carries the bundles itself, so
// one call (and one attestation) is all it takes. Within w.For it keeps
// the stream open through empty updates, and opens it again after an
// error that may clear up (see Wait); ctx bounds everything.
func (c *Client) FetchX509(ctx context.Context, pid int, w Wait) (*X509SVIDs, *x509bundle.Set, error) {
	deadline := time.Now().Add(w.For)
	delay := retryMin
	for {
		svids, set, err := c.fetchX509(ctx, pid, deadline, w.Bundles)
		if err == nil || !Retryable(err) || ctx.Err() != nil {
			return svids, set, err
		}
		if errors.Is(err, ErrAttestationFailed) && w.Alive != nil && w.Alive() != nil {
			return nil, nil, err
		}
		left := time.Until(deadline)
		if left <= 0 {
			if w.For > 0 {
				err = &ErrWaited{Waited: w.For, Err: err}
			}
			return nil, nil, err
		}
		t := time.NewTimer(min(delay, left))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, nil, err
		case <-t.C:
		}
		delay = min(2*delay, retryMax)
	}
}

// fetchX509 is one attempt: it opens the streams and reads SVID updates
// until one holds an SVID. Empty updates are read past until deadline.
func (c *Client) fetchX509(ctx context.Context, pid int, deadline time.Time, known *x509bundle.Set) (*X509SVIDs, *x509bundle.Set, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	type bundleResult struct {
		set *x509bundle.Set
		err error
	}
	bundles := make(chan bundleResult, 1)
	if known != nil {
		bundles <- bundleResult{known, nil}
	} else if !c.bundlesInUpdates {
		go func() {
			s, err := c.subscribeX509Bundles(ctx, pid)
			if err == nil {
				var set *x509bundle.Set
				set, err = s.Recv()
				bundles <- bundleResult{set, err}
				return
			}
			bundles <- bundleResult{nil, err}
		}()
	}

	// The SVID stream has a context of its own, ended when the wait runs
	// out after an empty update: the bundle stream's answer is not waited
	// for then.
	sctx, scancel := context.WithCancel(ctx)
	defer scancel()
	s, err := c.SubscribeX509SVIDs(sctx, pid)
	if err != nil {
		return nil, nil, err
	}
	var (
		svids   *X509SVIDs
		empty   error // the last empty update's error
		expired atomic.Bool
		timer   *time.Timer
	)
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		svids, err = s.Recv()
		if errors.Is(err, ErrNoIdentity) {
			empty = err
			if timer == nil {
				left := time.Until(deadline)
				if left <= 0 {
					return nil, nil, err
				}
				timer = time.AfterFunc(left, func() { expired.Store(true); scancel() })
			}
			continue
		}
		if err != nil && expired.Load() {
			return nil, nil, empty
		}
		break
	}
	if err != nil {
		return nil, nil, err
	}
	if c.bundlesInUpdates {
		if svids.Bundles == nil {
			return nil, nil, fmt.Errorf("agent %s: the SVID update for pid %d carries no bundle", c.socket, pid)
		}
		return svids, svids.Bundles, nil
	}
	b := <-bundles
	if b.err != nil {
		return nil, nil, b.err
	}
	return svids, b.set, nil
}

// Select picks the SVID a delivery asked for: the first by default, or the
// one whose SPIFFE ID is want. It never returns an SVID the agent did not.
func Select(svids []*x509svid.SVID, want string) (*x509svid.SVID, error) {
	if len(svids) == 0 {
		return nil, ErrNoIdentity
	}
	if want == "" {
		return svids[0], nil
	}
	for _, s := range svids {
		if s.ID.String() == want {
			return s, nil
		}
	}
	return nil, fmt.Errorf("spiffe_id %s is not among the identities the agent returned for this container (%s)", want, IDs(svids))
}

// IDs lists the SVIDs' SPIFFE IDs for messages.
func IDs(svids []*x509svid.SVID) string {
	ids := make([]string, len(svids))
	for i, s := range svids {
		ids[i] = s.ID.String()
	}
	return strings.Join(ids, ", ")
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
