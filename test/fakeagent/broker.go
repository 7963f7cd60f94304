package fakeagent

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	brokerv1 "github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Broker serves the fake agent's identities over the SPIFFE Broker API,
// the way SPIRE's experimental.broker endpoint does: mutual TLS with an
// agent SVID from the agent's CA, only the listed broker IDs admitted,
// the broker.spiffe.io header required, WorkloadPIDReference only.
type Broker struct {
	brokerv1.UnimplementedAPIServer
	a   *Agent
	srv *grpc.Server
	// Spec, when set, answers a pid without identity as the
	// specification says (PermissionDenied, WORKLOAD_NOT_ENTITLED);
	// otherwise as SPIRE 1.15.3 does (an update with no SVID).
	Spec bool
}

// ServeBroker serves the Broker API on socket for brokers.
func (a *Agent) ServeBroker(socket string, brokers ...spiffeid.ID) (*Broker, error) {
	serving, err := a.MintSVID(spiffeid.RequireFromPath(a.TrustDomain, "/spire/agent/fake"))
	if err != nil {
		return nil, err
	}
	bundle := x509bundle.FromX509Authorities(a.TrustDomain, []*x509.Certificate{a.caCert})
	tlsConf := tlsconfig.MTLSServerConfig(serving, bundle, tlsconfig.AuthorizeOneOf(brokers...))
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return nil, err
	}
	b := &Broker{a: a}
	header := func(ctx context.Context) error {
		if md, _ := metadata.FromIncomingContext(ctx); len(md["broker.spiffe.io"]) != 1 || md["broker.spiffe.io"][0] != "true" {
			return status.Error(codes.InvalidArgument, "security header missing from request")
		}
		return nil
	}
	b.srv = grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsConf)),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := header(ctx); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := header(ss.Context()); err != nil {
				return err
			}
			return h(srv, ss)
		}))
	brokerv1.RegisterAPIServer(b.srv, b)
	go b.srv.Serve(lis)
	return b, nil
}

// Stop closes the broker endpoint.
func (b *Broker) Stop() { b.srv.Stop() }

// MintSVID returns an X.509-SVID for id from the agent's CA (a broker's
// own SVID in tests).
func (a *Agent) MintSVID(id spiffeid.ID) (*x509svid.SVID, error) {
	sv, err := a.mint(id)
	if err != nil {
		return nil, err
	}
	return x509svid.ParseRaw(sv.X509Svid.CertChain[0], sv.X509SvidKey)
}

// ReasonError is a Broker API error with its google.rpc.ErrorInfo.
func ReasonError(code codes.Code, reason, msg string) error {
	st, err := status.New(code, msg).WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: "spiffe.io"})
	if err != nil {
		panic(err)
	}
	return st.Err()
}

func pidOf(ref *brokerv1.WorkloadReference) (int, error) {
	if ref == nil || ref.Reference == nil {
		return 0, ReasonError(codes.InvalidArgument, "WORKLOAD_REFERENCE_INVALID", "workload reference must be provided")
	}
	var pid brokerv1.WorkloadPIDReference
	if err := ref.Reference.UnmarshalTo(&pid); err != nil || pid.Pid <= 0 {
		return 0, ReasonError(codes.InvalidArgument, "WORKLOAD_REFERENCE_INVALID", fmt.Sprintf("not a PID reference: %s", ref.Reference.TypeUrl))
	}
	return int(pid.Pid), nil
}

// SubscribeToX509SVID implements the API.
func (b *Broker) SubscribeToX509SVID(req *brokerv1.SubscribeToX509SVIDRequest, stream brokerv1.API_SubscribeToX509SVIDServer) error {
	a := b.a
	a.svidStreams.Add(1)
	defer a.svidStreams.Add(-1)
	a.svidCalls.Add(1)
	pid, err := pidOf(req.Reference)
	if err != nil {
		return err
	}
	if refuse, _, _ := a.wait(stream.Context()); refuse != nil {
		return refuse
	}
	if refuse := a.refuseSVIDs(); refuse != nil {
		return refuse
	}
	return a.sendOnChange(stream.Context(), func() func() error {
		ids := a.identitiesOf(pid)
		resp := &brokerv1.SubscribeToX509SVIDResponse{FederatedBundles: a.addFederated(map[string][]byte{})}
		return func() error {
			if len(ids) == 0 && b.Spec {
				return ReasonError(codes.PermissionDenied, "WORKLOAD_NOT_ENTITLED", "no identity issued")
			}
			for _, id := range ids {
				sv, err := a.mint(id)
				if err != nil {
					return status.Error(codes.Internal, err.Error())
				}
				resp.Svids = append(resp.Svids, &brokerv1.X509SVID{
					SpiffeId:    id.String(),
					X509Svid:    sv.X509Svid.CertChain[0],
					X509SvidKey: sv.X509SvidKey,
					Bundle:      a.caCert.Raw,
				})
			}
			return stream.Send(resp)
		}
	})
}

// SubscribeToX509Bundles implements the API.
func (b *Broker) SubscribeToX509Bundles(req *brokerv1.SubscribeToX509BundlesRequest, stream brokerv1.API_SubscribeToX509BundlesServer) error {
	a := b.a
	a.bundleStreams.Add(1)
	defer a.bundleStreams.Add(-1)
	if _, err := pidOf(req.Reference); err != nil {
		return err
	}
	if refuse, _, _ := a.wait(stream.Context()); refuse != nil {
		return refuse
	}
	return a.sendOnChange(stream.Context(), func() func() error {
		resp := &brokerv1.SubscribeToX509BundlesResponse{Bundles: a.bundles()}
		return func() error { return stream.Send(resp) }
	})
}

// FetchJWTSVID implements the API with the Delegated Identity API's tokens.
func (b *Broker) FetchJWTSVID(ctx context.Context, req *brokerv1.FetchJWTSVIDRequest) (*brokerv1.FetchJWTSVIDResponse, error) {
	pid, err := pidOf(req.Reference)
	if err != nil {
		return nil, err
	}
	resp, err := b.a.FetchJWTSVIDs(ctx, &delegatedidentityv1.FetchJWTSVIDsRequest{Pid: int32(pid), Audience: req.Audience})
	if err != nil {
		if b.Spec && status.Code(err) == codes.PermissionDenied {
			return nil, ReasonError(codes.PermissionDenied, "WORKLOAD_NOT_ENTITLED", "no identity issued")
		}
		return nil, err
	}
	out := &brokerv1.FetchJWTSVIDResponse{}
	for _, sv := range resp.Svids {
		out.Svids = append(out.Svids, &brokerv1.JWTSVID{SpiffeId: "spiffe://" + sv.Id.TrustDomain + sv.Id.Path, Svid: sv.Token})
	}
	return out, nil
}

// SubscribeToJWTBundles implements the API with the Delegated Identity
// API's stream.
func (b *Broker) SubscribeToJWTBundles(req *brokerv1.SubscribeToJWTBundlesRequest, stream brokerv1.API_SubscribeToJWTBundlesServer) error {
	if _, err := pidOf(req.Reference); err != nil {
		return err
	}
	return b.a.SubscribeToJWTBundles(nil, jwtBundleStream{stream})
}

// jwtBundleStream turns the broker's stream into the delegated one.
type jwtBundleStream struct {
	brokerv1.API_SubscribeToJWTBundlesServer
}

func (s jwtBundleStream) Send(r *delegatedidentityv1.SubscribeToJWTBundlesResponse) error {
	return s.API_SubscribeToJWTBundlesServer.Send(&brokerv1.SubscribeToJWTBundlesResponse{Bundles: r.Bundles})
}
