package agent

import (
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
)

// brokerID is a static broker identity for the tests.
type brokerID struct {
	svid   *x509svid.SVID
	bundle *x509bundle.Bundle
}

func (b brokerID) GetX509SVID() (*x509svid.SVID, error) { return b.svid, nil }
func (b brokerID) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return b.bundle.GetX509BundleForTrustDomain(td)
}

var hookBroker = spiffeid.RequireFromString("spiffe://example.org/node/broker")

// startBroker serves a fake agent's Broker API admitting the broker IDs
// allowed, and returns a client presenting an SVID for me.
func startBroker(t *testing.T, me spiffeid.ID, allowed ...spiffeid.ID) (*fakeagent.Agent, *fakeagent.Broker, *Client) {
	t.Helper()
	a := fakeagent.Start(t, "example.org", socketPath(t))
	socket := socketPath(t)
	b, err := a.ServeBroker(socket, allowed...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Stop)
	svid, err := a.MintSVID(me)
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewBroker(socket, brokerID{svid, x509bundle.FromX509Authorities(a.TrustDomain, []*x509.Certificate{a.CA()})})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return a, b, c
}

// TestBrokerFetchX509: one call gives the SVID and, from the same update,
// the bundles the workload trusts, federated ones included.
func TestBrokerFetchX509(t *testing.T) {
	a, _, c := startBroker(t, hookBroker, hookBroker)
	web := spiffeid.RequireFromString("spiffe://example.org/web")
	a.Set(77, web)
	if _, err := a.Federate("other.org"); err != nil {
		t.Fatal(err)
	}
	u, bundles, err := c.FetchX509(ctx(t, 10*time.Second), 77, Wait{})
	if err != nil {
		t.Fatal(err)
	}
	if len(u.SVIDs) != 1 || u.SVIDs[0].ID != web {
		t.Fatalf("SVIDs = %v", IDs(u.SVIDs))
	}
	for _, td := range []string{"example.org", "other.org"} {
		if !bundles.Has(spiffeid.RequireTrustDomainFromString(td)) {
			t.Fatalf("no bundle for %s", td)
		}
	}
	if len(u.FederatesWith) != 1 || u.FederatesWith[0].Name() != "other.org" {
		t.Fatalf("FederatesWith = %v", u.FederatesWith)
	}
	own, _ := bundles.Get(spiffeid.RequireTrustDomainFromString("example.org"))
	if _, _, err := x509svid.Verify(u.SVIDs[0].Certificates, own); err != nil {
		t.Fatalf("SVID does not verify against the update's bundle: %v", err)
	}
	if a.BundleStreams() != 0 {
		t.Fatalf("%d bundle streams open: the Broker API needs none", a.BundleStreams())
	}
}

// TestBrokerNoIdentity: a pid without entry is ErrNoIdentity, whether
// the agent answers as SPIRE 1.15.3 does (an update with no SVID) or as
// the specification says (WORKLOAD_NOT_ENTITLED).
func TestBrokerNoIdentity(t *testing.T) {
	_, b, c := startBroker(t, hookBroker, hookBroker)
	for _, spec := range []bool{false, true} {
		b.Spec = spec
		_, _, err := c.FetchX509(ctx(t, 10*time.Second), 4242, Wait{})
		if !errors.Is(err, ErrNoIdentity) || !strings.Contains(err.Error(), "pid 4242") {
			t.Fatalf("spec=%v: error = %v, want ErrNoIdentity naming the pid", spec, err)
		}
		if spec && !strings.Contains(err.Error(), ReasonNotEntitled) {
			t.Fatalf("error %q does not name %s", err, ReasonNotEntitled)
		}
		_, err = c.FetchJWTSVIDs(ctx(t, 10*time.Second), 4242, []string{"aud"})
		if !errors.Is(err, ErrNoIdentity) {
			t.Fatalf("spec=%v: JWT: error = %v, want ErrNoIdentity", spec, err)
		}
	}
}

// TestBrokerReasons: each answer the Broker API gives maps to one line
// that names it and says what to do.
func TestBrokerReasons(t *testing.T) {
	a, _, c := startBroker(t, hookBroker, hookBroker)
	a.Set(5, spiffeid.RequireFromString("spiffe://example.org/web"))
	for _, tc := range []struct {
		refuse error
		is     error
		want   []string
	}{
		{fakeagent.ReasonError(codes.NotFound, ReasonNotFound, "no such process"), ErrAttestationFailed, []string{ReasonNotFound, "pid 5", "exited"}},
		{status.Error(codes.NotFound, "no such process"), ErrAttestationFailed, []string{ReasonNotFound, "pid 5"}},
		{fakeagent.ReasonError(codes.PermissionDenied, ReasonNotEntitled, "no identity issued"), ErrNoIdentity, []string{ReasonNotEntitled, "pid 5"}},
		{fakeagent.ReasonError(codes.InvalidArgument, ReasonReferenceInvalid, "negative pid"), ErrReferenceInvalid, []string{ReasonReferenceInvalid, "negative pid"}},
		// SPIRE 1.15.3's own wordings, without ErrorInfo.
		{status.Error(codes.Unauthenticated, `workload attestation failed: workload attestor "unix" failed`), ErrAttestationFailed, []string{"could not attest pid 5", "agent's log"}},
		{status.Error(codes.PermissionDenied, `broker "spiffe://example.org/node/broker" is not allowed to use reference type "x"`), ErrNotAuthorized, []string{pidReferenceType, "allowed_reference_types"}},
	} {
		a.Configure(func(a *fakeagent.Agent) { a.Refuse = tc.refuse })
		_, _, err := c.FetchX509(ctx(t, 10*time.Second), 5, Wait{})
		if !errors.Is(err, tc.is) {
			t.Errorf("%v: error = %v, want %v", tc.refuse, err, tc.is)
			continue
		}
		if errors.Is(err, ErrUnavailable) {
			t.Errorf("%v: reported as the agent being unavailable: %v", tc.refuse, err)
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not contain %q", err, w)
			}
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("error %q is more than one line", err)
		}
	}
}

// TestBrokerNotListed: an agent that does not list this broker's ID
// refuses it at the TLS handshake; the line names the ID and the setting.
func TestBrokerNotListed(t *testing.T) {
	other := spiffeid.RequireFromString("spiffe://example.org/someone-else")
	a, _, c := startBroker(t, hookBroker, other)
	a.Set(5, spiffeid.RequireFromString("spiffe://example.org/web"))
	_, _, err := c.FetchX509(ctx(t, 10*time.Second), 5, Wait{})
	if !errors.Is(err, ErrNotAuthorized) {
		t.Fatalf("error = %v, want ErrNotAuthorized", err)
	}
	for _, w := range []string{hookBroker.String(), "experimental.broker.brokers[].id"} {
		if !strings.Contains(err.Error(), w) {
			t.Fatalf("error %q does not contain %q", err, w)
		}
	}
}

// TestBrokerJWT: JWT-SVIDs and JWT bundles over the Broker API.
func TestBrokerJWT(t *testing.T) {
	a, _, c := startBroker(t, hookBroker, hookBroker)
	web := spiffeid.RequireFromString("spiffe://example.org/web")
	a.Set(9, web)
	j, b := fetchJWTWithBundle(t, c, 9, [][]string{{"a", "b"}})
	s, err := SelectJWT(j.For([]string{"a", "b"}), web)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtsvid.ParseAndValidate(s.Token, b, []string{"a", "b"}); err != nil {
		t.Fatal(err)
	}
	// No issue time in the Broker API: it comes from the token's iat.
	if s.Lifetime() < 4*time.Minute || s.Lifetime() > 6*time.Minute {
		t.Fatalf("lifetime %s, want the fake agent's 5m", s.Lifetime())
	}
}

// TestBrokerMissingSocket names the agent setting that makes the socket.
func TestBrokerMissingSocket(t *testing.T) {
	socket := socketPath(t)
	a := fakeagent.Start(t, "example.org", socketPath(t))
	svid, _ := a.MintSVID(hookBroker)
	c, err := NewBroker(socket, brokerID{svid, x509bundle.FromX509Authorities(a.TrustDomain, []*x509.Certificate{a.CA()})})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _, err = c.FetchX509(ctx(t, 10*time.Second), 1, Wait{})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "experimental { broker { socket_path") {
		t.Fatalf("error = %v", err)
	}
}

// TestFetchX509AttestationFailed: from SPIRE 1.15.2 the Delegated Identity
// API answers a pid it could not attest with Unavailable; that is not the
// agent being down.
func TestFetchX509AttestationFailed(t *testing.T) {
	a, c := start(t)
	a.Configure(func(a *fakeagent.Agent) {
		a.Refuse = status.Error(codes.Unavailable, "workload attestation failed")
	})
	_, _, err := c.FetchX509(ctx(t, 10*time.Second), 31337, Wait{})
	if !errors.Is(err, ErrAttestationFailed) || errors.Is(err, ErrUnavailable) {
		t.Fatalf("error = %v, want ErrAttestationFailed only", err)
	}
	for _, w := range []string{"could not attest pid 31337", "workload attestation failed", "agent's log"} {
		if !strings.Contains(err.Error(), w) {
			t.Fatalf("error %q does not contain %q", err, w)
		}
	}
}
