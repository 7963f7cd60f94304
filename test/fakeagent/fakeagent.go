// Package fakeagent is an in-process Delegated Identity API server for fast
// tests and fault injection: it mints SVIDs from its own CA, rotates them on
// demand, counts open streams, and can refuse or hang. Tests that prove the
// product use the real SPIRE agent (test/spiretest); this one covers
// what a real agent cannot be made to do on cue.
package fakeagent

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Agent is a fake SPIRE agent admin endpoint.
type Agent struct {
	delegatedidentityv1.UnimplementedDelegatedIdentityServer

	TrustDomain spiffeid.TrustDomain
	caKey       crypto.Signer
	caCert      *x509.Certificate

	mu sync.Mutex
	// identities maps a pid to the SPIFFE IDs it gets; Default applies to
	// any other pid when set.
	identities map[int][]spiffeid.ID
	Default    []spiffeid.ID
	// TTL of minted SVIDs.
	TTL time.Duration
	// Refuse, when set, is returned to every new stream (PermissionDenied, ...).
	Refuse error
	// RefuseSVIDs, when set, is returned to every new SVID stream only
	// (a pid the agent cannot attest), while bundles still flow.
	RefuseSVIDs error
	// Hang makes new streams block without ever sending.
	Hang bool
	// federated maps foreign trust domains to their CA: the bundle stream
	// sends them and every SVID update names them in FederatesWith.
	federated map[string]*x509.Certificate
	// JWTTTL is the lifetime of minted JWT-SVIDs (default 5 minutes).
	JWTTTL time.Duration
	// JWTHold, when not nil, makes FetchJWTSVIDs wait until it is closed.
	JWTHold chan struct{}
	jwtKey  *ecdsa.PrivateKey
	// generation bumps on Rotate; streams re-send when it changes.
	generation uint64
	changed    chan struct{}

	svidStreams   atomic.Int64
	svidCalls     atomic.Int64
	bundleStreams atomic.Int64

	srv *grpc.Server
	lis net.Listener
}

// New creates an agent for trust domain td and serves it on the unix socket path.
func New(td string, socket string) (*Agent, error) {
	a := &Agent{
		TrustDomain: spiffeid.RequireTrustDomainFromString(td),
		identities:  map[int][]spiffeid.ID{},
		federated:   map[string]*x509.Certificate{},
		TTL:         time.Hour,
		changed:     make(chan struct{}),
	}
	var err error
	if a.caKey, a.caCert, err = newCA(a.TrustDomain); err != nil {
		return nil, err
	}
	if err := a.Serve(socket); err != nil {
		return nil, err
	}
	return a, nil
}

func newCA(td spiffeid.TrustDomain) (crypto.Signer, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial.Add(1) + 1),
		Subject:               pkix.Name{CommonName: "fakeagent CA " + td.Name()},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return key, cert, err
}

// Federate makes every SVID federate with trust domain td, whose bundle
// becomes a new CA (a fresh one on every call: a foreign CA rotation). It
// returns that CA.
func (a *Agent) Federate(td string) (*x509.Certificate, error) {
	_, cert, err := newCA(spiffeid.RequireTrustDomainFromString(td))
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.federated[td] = cert
	a.mu.Unlock()
	a.Rotate()
	return cert, nil
}

// Defederate ends the federation with td: its bundle and its name go.
func (a *Agent) Defederate(td string) {
	a.mu.Lock()
	delete(a.federated, td)
	a.mu.Unlock()
	a.Rotate()
}

// Serve starts serving on socket (again, after Stop: same CA, same state).
func (a *Agent) Serve(socket string) error {
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	delegatedidentityv1.RegisterDelegatedIdentityServer(srv, a)
	a.mu.Lock()
	a.lis, a.srv = lis, srv
	a.mu.Unlock()
	go srv.Serve(lis)
	return nil
}

// Stop closes the server, its socket and every stream, like an agent that died.
func (a *Agent) Stop() {
	a.mu.Lock()
	srv := a.srv
	a.mu.Unlock()
	srv.Stop()
}

// Start is New for a test: it fails t if the agent cannot serve, and
// stops it when t ends.
func Start(t testing.TB, trustDomain, socket string) *Agent {
	t.Helper()
	a, err := New(trustDomain, socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Stop)
	return a
}

// Set gives pid the SPIFFE IDs ids (first is the default).
func (a *Agent) Set(pid int, ids ...spiffeid.ID) {
	a.mu.Lock()
	a.identities[pid] = ids
	a.mu.Unlock()
	a.Rotate()
}

// Configure changes fields under the lock.
func (a *Agent) Configure(f func(a *Agent)) {
	a.mu.Lock()
	f(a)
	a.mu.Unlock()
}

// Rotate mints new SVIDs for every open stream.
func (a *Agent) Rotate() {
	a.mu.Lock()
	a.generation++
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
}

// SVIDStreams is the number of open SubscribeToX509SVIDs streams.
func (a *Agent) SVIDStreams() int64 { return a.svidStreams.Load() }

// SVIDCalls is the number of SVID streams ever opened.
func (a *Agent) SVIDCalls() int64 { return a.svidCalls.Load() }

// BundleStreams is the number of open SubscribeToX509Bundles streams.
func (a *Agent) BundleStreams() int64 { return a.bundleStreams.Load() }

// CA returns the trust domain's CA certificate.
func (a *Agent) CA() *x509.Certificate { return a.caCert }

func (a *Agent) refuseSVIDs() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.RefuseSVIDs
}

func (a *Agent) wait(ctx context.Context) (refuse error, hang bool, changed chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.Refuse, a.Hang, a.changed
}

// SubscribeToX509SVIDs implements the API.
func (a *Agent) SubscribeToX509SVIDs(req *delegatedidentityv1.SubscribeToX509SVIDsRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509SVIDsServer) error {
	a.svidStreams.Add(1)
	defer a.svidStreams.Add(-1)
	a.svidCalls.Add(1)
	refuse, hang, _ := a.wait(stream.Context())
	if refuse != nil {
		return refuse
	}
	if refuse := a.refuseSVIDs(); refuse != nil {
		return refuse
	}
	if hang {
		<-stream.Context().Done()
		return stream.Context().Err()
	}
	return a.sendOnChange(stream.Context(), func() func() error {
		ids := a.identitiesOf(int(req.Pid))
		resp := &delegatedidentityv1.SubscribeToX509SVIDsResponse{}
		for td := range a.federated {
			resp.FederatesWith = append(resp.FederatesWith, td)
		}
		return func() error {
			for _, id := range ids {
				sv, err := a.mint(id)
				if err != nil {
					return status.Error(codes.Internal, err.Error())
				}
				resp.X509Svids = append(resp.X509Svids, sv)
			}
			return stream.Send(resp)
		}
	})
}

// SubscribeToX509Bundles implements the API.
func (a *Agent) SubscribeToX509Bundles(_ *delegatedidentityv1.SubscribeToX509BundlesRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToX509BundlesServer) error {
	a.bundleStreams.Add(1)
	defer a.bundleStreams.Add(-1)
	refuse, hang, _ := a.wait(stream.Context())
	if refuse != nil {
		return refuse
	}
	if hang {
		<-stream.Context().Done()
		return stream.Context().Err()
	}
	return a.sendOnChange(stream.Context(), func() func() error {
		resp := &delegatedidentityv1.SubscribeToX509BundlesResponse{CaCertificates: a.bundles()}
		return func() error { return stream.Send(resp) }
	})
}

// sendOnChange is the loop of the agent's streams: snapshot runs under
// a.mu and returns what sends that state (it mints, if it must, after
// the lock is released); the send happens again each time the state
// changes (Rotate, Set, Federate, …), until it fails or the stream's
// context ends. The change channel is taken under the same lock as the
// snapshot, so a change after the snapshot is never missed.
func (a *Agent) sendOnChange(ctx context.Context, snapshot func() (send func() error)) error {
	for {
		a.mu.Lock()
		changed := a.changed
		send := snapshot()
		a.mu.Unlock()
		if err := send(); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil
		}
	}
}

// identitiesOf is the SPIFFE IDs pid gets: its own, or Default. a.mu is
// held.
func (a *Agent) identitiesOf(pid int) []spiffeid.ID {
	if ids, ok := a.identities[pid]; ok {
		return ids
	}
	return a.Default
}

// bundles is the trust domain's CA and every federated one, by trust
// domain ID. a.mu is held.
func (a *Agent) bundles() map[string][]byte {
	return a.addFederated(map[string][]byte{a.TrustDomain.IDString(): a.caCert.Raw})
}

// addFederated adds every federated trust domain's CA to bundles, by
// trust domain ID, and returns it. a.mu is held.
func (a *Agent) addFederated(bundles map[string][]byte) map[string][]byte {
	for td, cert := range a.federated {
		bundles[spiffeid.RequireTrustDomainFromString(td).IDString()] = cert.Raw
	}
	return bundles
}

var serial atomic.Int64

func (a *Agent) mint(id spiffeid.ID) (*delegatedidentityv1.X509SVIDWithKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	ttl := a.TTL
	a.mu.Unlock()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1) + 1),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(ttl),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.caCert, key.Public(), a.caKey)
	if err != nil {
		return nil, err
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &delegatedidentityv1.X509SVIDWithKey{
		X509Svid: &types.X509SVID{
			Id:        &types.SPIFFEID{TrustDomain: id.TrustDomain().Name(), Path: id.Path()},
			CertChain: [][]byte{der},
			ExpiresAt: tmpl.NotAfter.Unix(),
		},
		X509SvidKey: pkcs8,
	}, nil
}
