package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	brokerv1 "github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

// The Broker API's error reasons (google.rpc.ErrorInfo.reason, domain
// spiffe.io), SPIFFE Broker API section 4.8.
const (
	ReasonReferenceInvalid = "WORKLOAD_REFERENCE_INVALID"
	ReasonNotFound         = "WORKLOAD_NOT_FOUND"
	ReasonNotEntitled      = "WORKLOAD_NOT_ENTITLED"
)

// securityHeader must be on every call: the SPIFFE Broker Endpoint's SSRF
// guard (SPIRE answers InvalidArgument without it).
const securityHeader = "broker.spiffe.io"

// BrokerIdentity is the broker's own identity, which the agent
// authenticates by mutual TLS and checks against experimental.broker's
// brokers[].id. Its bundle source verifies the agent's serving SVID.
type BrokerIdentity interface {
	x509svid.Source
	x509bundle.Source
}

// NewBroker returns a client of the SPIFFE Broker API on the agent's
// broker socket at path, presenting the SVID of id. It does not connect
// until the first call. The agent serves with its own SVID, which must be
// a member of the broker SVID's trust domain (checked at each handshake:
// the refresher's broker SVID arrives after the client is made).
func NewBroker(socket string, id BrokerIdentity, opts ...grpc.DialOption) (*Client, error) {
	sameTrustDomain := func(agentID spiffeid.ID, _ [][]*x509.Certificate) error {
		own, err := id.GetX509SVID()
		if err != nil {
			return err
		}
		if !agentID.MemberOf(own.ID.TrustDomain()) {
			return fmt.Errorf("agent serves as %s, outside the broker's trust domain %s", agentID, own.ID.TrustDomain())
		}
		return nil
	}
	tlsConf := tlsconfig.MTLSClientConfig(id, id, sameTrustDomain)
	opts = append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return invoker(metadata.AppendToOutgoingContext(ctx, securityHeader, "true"), method, req, reply, cc, opts...)
		}),
		grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			return streamer(metadata.AppendToOutgoingContext(ctx, securityHeader, "true"), desc, cc, method, opts...)
		}),
	}, opts...)
	conn, err := grpc.NewClient("unix:"+socket, opts...)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", socket, err)
	}
	return &Client{
		socket:           socket,
		conn:             conn,
		api:              &broker{socket: socket, id: id, tls: tlsConf, api: brokerv1.NewAPIClient(conn)},
		bundlesInUpdates: true,
	}, nil
}

// broker is the SPIFFE Broker API: every call names the workload by a
// WorkloadPIDReference; the agent attests that pid itself.
type broker struct {
	socket string
	id     x509svid.Source
	tls    *tls.Config
	api    brokerv1.APIClient
}

func pidReference(pid int) (*brokerv1.WorkloadReference, error) {
	ref, err := anypb.New(&brokerv1.WorkloadPIDReference{Pid: int32(pid)})
	if err != nil {
		return nil, err
	}
	return &brokerv1.WorkloadReference{Reference: ref}, nil
}

func (b *broker) subscribeX509SVIDs(ctx context.Context, pid int) (func() (*rawX509, error), error) {
	ref, err := pidReference(pid)
	if err != nil {
		return nil, err
	}
	s, err := b.api.SubscribeToX509SVID(ctx, &brokerv1.SubscribeToX509SVIDRequest{Reference: ref})
	if err != nil {
		return nil, err
	}
	return recvEach(s, func(resp *brokerv1.SubscribeToX509SVIDResponse) (*rawX509, error) {
		out := &rawX509{bundles: map[string][]byte{}}
		for i, sv := range resp.Svids {
			id, err := spiffeid.FromString(sv.SpiffeId)
			if err != nil {
				return nil, fmt.Errorf("agent %s: SVID %d for pid %d: %w", b.socket, i, pid, err)
			}
			// Each SVID carries its own trust domain's bundle.
			if len(sv.Bundle) == 0 {
				return nil, fmt.Errorf("agent %s: SVID %d for pid %d (%s) carries no bundle", b.socket, i, pid, id)
			}
			out.bundles[id.TrustDomain().IDString()] = sv.Bundle
			out.svids = append(out.svids, rawSVID{chain: sv.X509Svid, key: sv.X509SvidKey, hint: sv.Hint})
		}
		for td, der := range resp.FederatedBundles {
			out.federatesWith = append(out.federatesWith, td)
			out.bundles[td] = der
		}
		return out, nil
	}), nil
}

func (b *broker) subscribeX509Bundles(ctx context.Context, pid int) (func() (map[string][]byte, error), error) {
	ref, err := pidReference(pid)
	if err != nil {
		return nil, err
	}
	s, err := b.api.SubscribeToX509Bundles(ctx, &brokerv1.SubscribeToX509BundlesRequest{Reference: ref})
	if err != nil {
		return nil, err
	}
	return nextBundles(s, (*brokerv1.SubscribeToX509BundlesResponse).GetBundles), nil
}

func (b *broker) fetchJWTSVIDs(ctx context.Context, pid int, audience []string) ([]rawJWT, error) {
	ref, err := pidReference(pid)
	if err != nil {
		return nil, err
	}
	resp, err := b.api.FetchJWTSVID(ctx, &brokerv1.FetchJWTSVIDRequest{Reference: ref, Audience: audience})
	if err != nil {
		return nil, err
	}
	out := make([]rawJWT, len(resp.Svids))
	for i, sv := range resp.Svids {
		if sv != nil {
			out[i] = rawJWT{id: sv.SpiffeId, token: sv.Svid}
		}
	}
	return out, nil
}

func (b *broker) subscribeJWTBundles(ctx context.Context, pid int) (func() (map[string][]byte, error), error) {
	ref, err := pidReference(pid)
	if err != nil {
		return nil, err
	}
	s, err := b.api.SubscribeToJWTBundles(ctx, &brokerv1.SubscribeToJWTBundlesRequest{Reference: ref})
	if err != nil {
		return nil, err
	}
	return nextBundles(s, (*brokerv1.SubscribeToJWTBundlesResponse).GetBundles), nil
}

// reason returns the Broker API reason of st, if it carries one.
func reason(st *status.Status) string {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.Reason
		}
	}
	return ""
}

// explain maps the Broker API's answers to one line each. SPIRE 1.15.3
// sends no ErrorInfo (see docs/broker-api.md), so the status code and, for
// its own wordings, the message decide where the reason is missing.
func (b *broker) explain(err error, pid int) error {
	socket := b.socket
	st, explained := statusOf(socket, err)
	if explained != nil {
		return explained
	}
	msg := oneLine(st.Message())
	r := reason(st)
	switch {
	case r == ReasonNotEntitled || (st.Code() == codes.PermissionDenied && r == "" && strings.Contains(msg, "no identity issued")):
		return fmt.Errorf("agent %s: pid %d (%s): %w", socket, pid, ReasonNotEntitled, ErrNoIdentity)
	case r == ReasonNotFound || (st.Code() == codes.NotFound && r == ""):
		return fmt.Errorf("agent %s found no workload for pid %d (%s: %s): the container's process may have exited (%w)", socket, pid, ReasonNotFound, msg, ErrAttestationFailed)
	case r == ReasonReferenceInvalid:
		return fmt.Errorf("agent %s refused the reference to pid %d (%s: %s) (%w)", socket, pid, ReasonReferenceInvalid, msg, ErrReferenceInvalid)
	case st.Code() == codes.Unauthenticated && strings.Contains(msg, "workload attestation failed"):
		// SPIRE's answer when its attestors fail on the pid.
		return attestationFailed(socket, pid, msg)
	case st.Code() == codes.PermissionDenied && strings.Contains(msg, "reference type"):
		return fmt.Errorf("agent %s does not let this broker use PID references (%s): list type_url = %q in allowed_reference_types of its entry in experimental.broker.brokers (%w)",
			socket, msg, pidReferenceType, ErrNotAuthorized)
	case st.Code() == codes.InvalidArgument:
		return fmt.Errorf("agent %s refused the request for pid %d (%s): an agent older than SPIRE 1.15.2, or a broker endpoint that does not take PID references? (%w)", socket, pid, msg, ErrReferenceInvalid)
	case st.Code() == codes.Unavailable:
		if _, statErr := os.Stat(socket); statErr != nil {
			return fmt.Errorf("agent broker socket %s is missing: start the SPIRE agent with experimental { broker { socket_path = %q } } (%w)", socket, socket, ErrUnavailable)
		}
		if strings.Contains(msg, "no broker SVID") {
			// This side has no SVID to present (the refresher's comes
			// from the Workload API and may not have arrived yet).
			return fmt.Errorf("agent %s: this broker has no X.509-SVID to present (%s) (%w)", socket, msg, ErrUnavailable)
		}
		if isTLSRefusal(msg) || b.refusedByTLS() {
			return fmt.Errorf("agent %s refused this broker's X.509-SVID%s (%s): add that SPIFFE ID to the agent's experimental.broker.brokers[].id (%w)", socket, b.brokerID(), msg, ErrNotAuthorized)
		}
		if strings.Contains(msg, "x509svid:") || strings.Contains(msg, "unexpected ID") {
			// This side refused the agent's certificate.
			return fmt.Errorf("agent %s presented a certificate this broker does not trust (%s): the broker's bundle comes with its SVID from the agent's Workload API; is it the same agent? (%w)", socket, msg, ErrUnavailable)
		}
		return fmt.Errorf("agent broker socket %s does not answer: is the SPIRE agent running? (%s) (%w)", socket, msg, ErrUnavailable)
	case st.Code() == codes.PermissionDenied || st.Code() == codes.Unauthenticated:
		return fmt.Errorf("agent %s refused this broker%s (%s): add its SPIFFE ID to the agent's experimental.broker.brokers[].id (%w)", socket, b.brokerID(), msg, ErrNotAuthorized)
	}
	return commonExplain(socket, st)
}

// pidReferenceType is the type URL brokers[].allowed_reference_types must list.
const pidReferenceType = "type.googleapis.com/spiffe.broker.WorkloadPIDReference"

// brokerID names the SVID this client presents, for messages.
func (b *broker) brokerID() string {
	svid, err := b.id.GetX509SVID()
	if err != nil || svid == nil {
		return ""
	}
	return " " + svid.ID.String()
}

// refusedByTLS tells, on the failure path only, whether the agent turns
// this broker's SVID down: with TLS 1.3 the server checks the client's
// certificate after the client has finished its handshake, so gRPC may
// only see the closed connection ("broken pipe"). A handshake of its own
// and one read get the server's alert.
func (b *broker) refusedByTLS() bool {
	conn, err := net.DialTimeout("unix", b.socket, time.Second)
	if err != nil {
		return false
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Second))
	conf := b.tls.Clone()
	conf.NextProtos = []string{"h2"}
	c := tls.Client(conn, conf)
	if err := c.Handshake(); err != nil {
		return isTLSRefusal(err.Error())
	}
	_, err = c.Read(make([]byte, 1))
	return err != nil && isTLSRefusal(err.Error())
}

// isTLSRefusal: the agent's TLS server turned the broker's certificate
// down (with TLS 1.3 the client learns it on its first read).
func isTLSRefusal(msg string) bool {
	for _, s := range []string{"remote error: tls: bad certificate", "certificate required", "remote error: tls: unknown certificate", "remote error: tls: handshake failure", "remote error: tls: access denied"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}
