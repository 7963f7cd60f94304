package fakeagent

import (
	"net"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// WorkloadAPI serves the X.509 part of the Workload API: every caller
// gets an SVID for ID (a broker's own identity in tests), minted anew on
// each Rotate. It does not attest callers.
type WorkloadAPI struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	a   *Agent
	ID  spiffeid.ID
	srv *grpc.Server
}

// ServeWorkloadAPI serves the Workload API on socket, handing out id.
func (a *Agent) ServeWorkloadAPI(socket string, id spiffeid.ID) (*WorkloadAPI, error) {
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return nil, err
	}
	w := &WorkloadAPI{a: a, ID: id, srv: grpc.NewServer()}
	workload.RegisterSpiffeWorkloadAPIServer(w.srv, w)
	go w.srv.Serve(lis)
	return w, nil
}

// Stop closes the endpoint.
func (w *WorkloadAPI) Stop() { w.srv.Stop() }

// FetchX509SVID implements the Workload API.
func (w *WorkloadAPI) FetchX509SVID(_ *workload.X509SVIDRequest, stream workload.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	if md, _ := metadata.FromIncomingContext(stream.Context()); len(md["workload.spiffe.io"]) != 1 {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	a := w.a
	return a.sendOnChange(stream.Context(), func() func() error {
		return func() error {
			sv, err := a.mint(w.ID)
			if err != nil {
				return status.Error(codes.Internal, err.Error())
			}
			return stream.Send(&workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
				SpiffeId:    w.ID.String(),
				X509Svid:    sv.X509Svid.CertChain[0],
				X509SvidKey: sv.X509SvidKey,
				Bundle:      a.caCert.Raw,
			}}})
		}
	})
}
