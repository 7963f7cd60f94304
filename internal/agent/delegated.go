package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// New returns a client of the Delegated Identity API on the agent's admin
// socket at path. It does not connect until the first call. opts add to
// the defaults (the refresher bounds gRPC's reconnect backoff with them).
func New(socket string, opts ...grpc.DialOption) (*Client, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	conn, err := grpc.NewClient("unix:"+socket, opts...)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", socket, err)
	}
	return &Client{
		socket: socket,
		conn:   conn,
		api:    &delegated{socket: socket, api: delegatedidentityv1.NewDelegatedIdentityClient(conn)},
	}, nil
}

// delegated is the Delegated Identity API: the agent attests the caller
// (uid and binary) and checks it against authorized_delegates.
type delegated struct {
	socket string
	api    delegatedidentityv1.DelegatedIdentityClient
}

func (d *delegated) subscribeX509SVIDs(ctx context.Context, pid int) (func() (*rawX509, error), error) {
	s, err := d.api.SubscribeToX509SVIDs(ctx, &delegatedidentityv1.SubscribeToX509SVIDsRequest{Pid: int32(pid)})
	if err != nil {
		return nil, err
	}
	return recvEach(s, func(resp *delegatedidentityv1.SubscribeToX509SVIDsResponse) (*rawX509, error) {
		out := &rawX509{federatesWith: resp.FederatesWith}
		for _, sv := range resp.X509Svids {
			if sv.X509Svid == nil {
				out.svids = append(out.svids, rawSVID{})
				continue
			}
			out.svids = append(out.svids, rawSVID{chain: bytes.Join(sv.X509Svid.CertChain, nil), key: sv.X509SvidKey, hint: sv.X509Svid.Hint})
		}
		return out, nil
	}), nil
}

func (d *delegated) subscribeX509Bundles(ctx context.Context, _ int) (func() (map[string][]byte, error), error) {
	s, err := d.api.SubscribeToX509Bundles(ctx, &delegatedidentityv1.SubscribeToX509BundlesRequest{})
	if err != nil {
		return nil, err
	}
	return nextBundles(s, (*delegatedidentityv1.SubscribeToX509BundlesResponse).GetCaCertificates), nil
}

func (d *delegated) fetchJWTSVIDs(ctx context.Context, pid int, audience []string) ([]rawJWT, error) {
	resp, err := d.api.FetchJWTSVIDs(ctx, &delegatedidentityv1.FetchJWTSVIDsRequest{Pid: int32(pid), Audience: audience})
	if err != nil {
		// The agent answers a pid no entry matches with PermissionDenied,
		// which would otherwise read as this caller not being authorized.
		if st, ok := status.FromError(err); ok && st.Code() == codes.PermissionDenied && strings.Contains(st.Message(), "no identity issued") {
			return nil, fmt.Errorf("agent %s: pid %d: %w", d.socket, pid, ErrNoIdentity)
		}
		return nil, err
	}
	out := make([]rawJWT, len(resp.Svids))
	for i, sv := range resp.Svids {
		if sv == nil || sv.Id == nil {
			continue // an empty one: the parser says so
		}
		out[i] = rawJWT{id: "spiffe://" + sv.Id.TrustDomain + sv.Id.Path, token: sv.Token, issuedAt: sv.IssuedAt}
	}
	return out, nil
}

func (d *delegated) subscribeJWTBundles(ctx context.Context, _ int) (func() (map[string][]byte, error), error) {
	s, err := d.api.SubscribeToJWTBundles(ctx, &delegatedidentityv1.SubscribeToJWTBundlesRequest{})
	if err != nil {
		return nil, err
	}
	return nextBundles(s, (*delegatedidentityv1.SubscribeToJWTBundlesResponse).GetBundles), nil
}

// explain turns a gRPC error into one that says what the operator should
// look at. The agent reports most failures on the first Recv, not on open.
func (d *delegated) explain(err error, pid int) error {
	socket := d.socket
	st, explained := statusOf(socket, err)
	if explained != nil {
		return explained
	}
	switch st.Code() {
	case codes.Unavailable:
		// From SPIRE 1.15.2 (spiffe/spire#7045) a pid the agent could not
		// attest is Unavailable too; the agent is up, so say what it is.
		if strings.Contains(st.Message(), "workload attestation failed") {
			return attestationFailed(socket, pid, st.Message())
		}
		if _, statErr := os.Stat(socket); statErr != nil {
			return fmt.Errorf("agent admin socket %s is missing: start the SPIRE agent with admin_socket_path = %q (%w)", socket, socket, ErrUnavailable)
		}
		return fmt.Errorf("agent admin socket %s does not answer: is the SPIRE agent running? (%s) (%w)", socket, oneLine(st.Message()), ErrUnavailable)
	case codes.PermissionDenied, codes.Unauthenticated:
		exe, _ := os.Executable()
		return fmt.Errorf("agent %s refused this caller (%s): add its SPIFFE ID to the agent's authorized_delegates and register it with selectors unix:uid:%d and unix:path:%s (%w)",
			socket, oneLine(st.Message()), os.Getuid(), exe, ErrNotAuthorized)
	}
	return commonExplain(socket, st)
}

// statusOf is where both APIs' explain start: an error that already
// says what it is (ErrNoIdentity), a timeout, or one without a gRPC
// status comes back explained; any other, as the status to explain.
func statusOf(socket string, err error) (st *status.Status, explained error) {
	if errors.Is(err, ErrNoIdentity) {
		return nil, err
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return nil, fmt.Errorf("agent %s did not answer in time: %w", socket, err)
	}
	st, ok := status.FromError(err)
	if !ok {
		return nil, fmt.Errorf("agent %s: %w", socket, err)
	}
	return st, nil
}

// attestationFailed is the one line for a pid the agent could not attest.
func attestationFailed(socket string, pid int, msg string) error {
	return fmt.Errorf("agent %s could not attest pid %d (%s): the container's process may have exited, or a workload attestor failed; see the agent's log (%w)",
		socket, pid, oneLine(msg), ErrAttestationFailed)
}

// commonExplain handles the codes both APIs answer alike.
func commonExplain(socket string, st *status.Status) error {
	switch st.Code() {
	case codes.DeadlineExceeded:
		return fmt.Errorf("agent %s did not answer in time: %w", socket, context.DeadlineExceeded)
	case codes.Canceled:
		return fmt.Errorf("agent %s: %w", socket, context.Canceled)
	}
	return fmt.Errorf("agent %s: %s: %s", socket, st.Code(), oneLine(st.Message()))
}

func selfPID() int { return os.Getpid() }
