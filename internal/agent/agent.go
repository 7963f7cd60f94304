// Package agent is the one client of the SPIRE agent's Delegated Identity
// API (the admin socket) used by both the hook and the refresher.
//
// It turns the API's protobuf messages into go-spiffe values, so that
// everything downstream handles certificates and keys that were parsed and
// checked (leaf is an SVID, key matches, chain is well formed).
package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// ErrNoIdentity means the agent answered but no registration entry matched the pid.
var ErrNoIdentity = errors.New("no registration entry matches the container's process")

// Client talks to one agent admin socket.
type Client struct {
	socket string
	conn   *grpc.ClientConn
	api    delegatedidentityv1.DelegatedIdentityClient
}

// New returns a client for the admin socket at path. It does not connect
// until the first call. opts add to the defaults (the refresher bounds
// gRPC's reconnect backoff with them).
func New(socket string, opts ...grpc.DialOption) (*Client, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	conn, err := grpc.NewClient("unix:"+socket, opts...)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", socket, err)
	}
	return &Client{socket: socket, conn: conn, api: delegatedidentityv1.NewDelegatedIdentityClient(conn)}, nil
}

// Socket returns the admin socket path.
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
}

// SVIDStream receives X.509 SVID updates for one pid.
type SVIDStream struct {
	pid    int
	socket string
	stream grpc.ServerStreamingClient[delegatedidentityv1.SubscribeToX509SVIDsResponse]
}

// SubscribeX509SVIDs opens a stream of X.509 SVIDs for the process pid.
// The agent attests pid once, when the stream opens; keeping pid's process
// the same one (pidfd) and closing the stream are the caller's job.
func (c *Client) SubscribeX509SVIDs(ctx context.Context, pid int) (*SVIDStream, error) {
	s, err := c.api.SubscribeToX509SVIDs(ctx, &delegatedidentityv1.SubscribeToX509SVIDsRequest{Pid: int32(pid)})
	if err != nil {
		return nil, c.explain(err)
	}
	return &SVIDStream{pid: pid, socket: c.socket, stream: s}, nil
}

// Recv waits for the next update. An update with no SVID is ErrNoIdentity.
func (s *SVIDStream) Recv() (*X509SVIDs, error) {
	resp, err := s.stream.Recv()
	if err != nil {
		return nil, explain(s.socket, err)
	}
	if len(resp.X509Svids) == 0 {
		return nil, fmt.Errorf("agent %s: pid %d: %w", s.socket, s.pid, ErrNoIdentity)
	}
	out := &X509SVIDs{}
	for i, sv := range resp.X509Svids {
		if sv.X509Svid == nil {
			return nil, fmt.Errorf("agent %s: SVID %d for pid %d is empty", s.socket, i, s.pid)
		}
		svid, err := x509svid.ParseRaw(bytes.Join(sv.X509Svid.CertChain, nil), sv.X509SvidKey)
		if err != nil {
			return nil, fmt.Errorf("agent %s: SVID %d for pid %d: %w", s.socket, i, s.pid, err)
		}
		svid.Hint = sv.X509Svid.Hint
		out.SVIDs = append(out.SVIDs, svid)
	}
	for _, td := range resp.FederatesWith {
		t, err := spiffeid.TrustDomainFromString(td)
		if err != nil {
			return nil, fmt.Errorf("agent %s: federated trust domain %q: %w", s.socket, td, err)
		}
		out.FederatesWith = append(out.FederatesWith, t)
	}
	return out, nil
}

// BundleStream receives X.509 bundle updates: every trust domain the agent
// knows, its own and federated ones.
type BundleStream struct {
	socket string
	stream grpc.ServerStreamingClient[delegatedidentityv1.SubscribeToX509BundlesResponse]
}

// SubscribeX509Bundles opens the stream of X.509 bundles.
func (c *Client) SubscribeX509Bundles(ctx context.Context) (*BundleStream, error) {
	s, err := c.api.SubscribeToX509Bundles(ctx, &delegatedidentityv1.SubscribeToX509BundlesRequest{})
	if err != nil {
		return nil, c.explain(err)
	}
	return &BundleStream{socket: c.socket, stream: s}, nil
}

// Recv waits for the next set of bundles.
func (s *BundleStream) Recv() (*x509bundle.Set, error) {
	resp, err := s.stream.Recv()
	if err != nil {
		return nil, explain(s.socket, err)
	}
	set := x509bundle.NewSet()
	for id, der := range resp.CaCertificates {
		td, err := spiffeid.TrustDomainFromString(id)
		if err != nil {
			return nil, fmt.Errorf("agent %s: bundle trust domain %q: %w", s.socket, id, err)
		}
		b, err := x509bundle.ParseRaw(td, der)
		if err != nil {
			return nil, fmt.Errorf("agent %s: bundle of %s: %w", s.socket, td, err)
		}
		set.Add(b)
	}
	return set, nil
}

// FetchX509 returns the first SVID update for pid and the first bundle set,
// asking for both at once.
func (c *Client) FetchX509(ctx context.Context, pid int) (*X509SVIDs, *x509bundle.Set, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	type bundleResult struct {
		set *x509bundle.Set
		err error
	}
	bundles := make(chan bundleResult, 1)
	go func() {
		s, err := c.SubscribeX509Bundles(ctx)
		if err == nil {
			var set *x509bundle.Set
			set, err = s.Recv()
			bundles <- bundleResult{set, err}
			return
		}
		bundles <- bundleResult{nil, err}
	}()

	s, err := c.SubscribeX509SVIDs(ctx, pid)
	if err != nil {
		return nil, nil, err
	}
	svids, err := s.Recv()
	if err != nil {
		return nil, nil, err
	}
	b := <-bundles
	if b.err != nil {
		return nil, nil, b.err
	}
	return svids, b.set, nil
}

func (c *Client) explain(err error) error { return explain(c.socket, err) }

// explain turns a gRPC error into one that says what the operator should
// look at. The agent reports most failures on the first Recv, not on open.
func explain(socket string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("agent %s did not answer in time: %w", socket, err)
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("agent %s: %w", socket, err)
	}
	switch st.Code() {
	case codes.Unavailable:
		if _, statErr := os.Stat(socket); statErr != nil {
			return fmt.Errorf("agent admin socket %s is missing: start the SPIRE agent with admin_socket_path = %q (%w)", socket, socket, ErrUnavailable)
		}
		return fmt.Errorf("agent admin socket %s does not answer: is the SPIRE agent running? (%s) (%w)", socket, oneLine(st.Message()), ErrUnavailable)
	case codes.PermissionDenied, codes.Unauthenticated:
		exe, _ := os.Executable()
		return fmt.Errorf("agent %s refused this caller (%s): add its SPIFFE ID to the agent's authorized_delegates and register it with selectors unix:uid:%d and unix:path:%s (%w)",
			socket, oneLine(st.Message()), os.Getuid(), exe, ErrNotAuthorized)
	case codes.DeadlineExceeded:
		return fmt.Errorf("agent %s did not answer in time: %w", socket, context.DeadlineExceeded)
	case codes.Canceled:
		return fmt.Errorf("agent %s: %w", socket, context.Canceled)
	}
	return fmt.Errorf("agent %s: %s: %s", socket, st.Code(), oneLine(st.Message()))
}

// Errors callers may want to tell apart.
var (
	ErrUnavailable   = errors.New("agent unavailable")
	ErrNotAuthorized = errors.New("caller is not an authorized delegate")
)

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
