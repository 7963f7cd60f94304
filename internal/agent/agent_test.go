package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// socketPath returns a socket path short enough for a unix socket (108
// bytes); t.TempDir() can be too long under some test runners.
func socketPath(t *testing.T) string {
	t.Helper()
	return filepath.Join(testhelp.ShortTempDir(t, "agt"), "a.sock")
}

func start(t *testing.T) (*fakeagent.Agent, *Client) {
	t.Helper()
	socket := socketPath(t)
	a := fakeagent.Start(t, "example.org", socket)
	c, err := New(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if c.Socket() != socket {
		t.Fatalf("Socket() = %q", c.Socket())
	}
	return a, c
}

// waitStreamsClosed fails t unless every stream to a closes within 5 s
// (the server side closes them asynchronously once the client has).
func waitStreamsClosed(t *testing.T, a *fakeagent.Agent) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for a.SVIDStreams() != 0 || a.BundleStreams() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("streams left open: %d SVID, %d bundle", a.SVIDStreams(), a.BundleStreams())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ctx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestFetchX509(t *testing.T) {
	a, c := start(t)
	web := spiffeid.RequireFromString("spiffe://example.org/web")
	admin := spiffeid.RequireFromString("spiffe://example.org/admin")
	a.Set(4242, web, admin)
	a.Configure(func(a *fakeagent.Agent) {
		a.Default = []spiffeid.ID{spiffeid.RequireFromString("spiffe://example.org/other")}
	})

	svids, bundles, err := c.FetchX509(ctx(t, 10*time.Second), 4242, Wait{})
	if err != nil {
		t.Fatal(err)
	}
	if len(svids.SVIDs) != 2 || svids.SVIDs[0].ID != web || svids.SVIDs[1].ID != admin {
		t.Fatalf("SVIDs = %s, want %s, %s", IDs(svids.SVIDs), web, admin)
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	b, ok := bundles.Get(td)
	if !ok {
		t.Fatalf("bundle set lacks %s", td)
	}
	if auth := b.X509Authorities(); len(auth) != 1 || !auth[0].Equal(a.CA()) {
		t.Fatalf("bundle authorities do not match the agent's CA")
	}
	// The SVIDs chain to the bundle and carry their keys.
	for _, s := range svids.SVIDs {
		if _, _, err := x509svid.Verify(s.Certificates, bundles); err != nil {
			t.Fatalf("SVID %s does not verify: %v", s.ID, err)
		}
		if s.PrivateKey == nil {
			t.Fatalf("SVID %s has no key", s.ID)
		}
	}
	// Another pid gets the default identity.
	svids, _, err = c.FetchX509(ctx(t, 10*time.Second), 7, Wait{})
	if err != nil {
		t.Fatal(err)
	}
	if got := IDs(svids.SVIDs); got != "spiffe://example.org/other" {
		t.Fatalf("default identity = %s", got)
	}
}

func TestSubscribeRotates(t *testing.T) {
	a, c := start(t)
	web := spiffeid.RequireFromString("spiffe://example.org/web")
	a.Set(10, web)
	s, err := c.SubscribeX509SVIDs(ctx(t, 10*time.Second), 10)
	if err != nil {
		t.Fatal(err)
	}
	first, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	a.Rotate()
	second, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if second.SVIDs[0].ID != web || first.SVIDs[0].Certificates[0].Equal(second.SVIDs[0].Certificates[0]) {
		t.Fatal("rotation did not deliver a new certificate for the same ID")
	}
}

func TestFetchX509NoIdentity(t *testing.T) {
	_, c := start(t)
	_, _, err := c.FetchX509(ctx(t, 10*time.Second), 4242, Wait{})
	if !errors.Is(err, ErrNoIdentity) {
		t.Fatalf("error = %v, want ErrNoIdentity", err)
	}
	if !strings.Contains(err.Error(), "pid 4242") {
		t.Fatalf("error %q does not name the pid", err)
	}
}

func TestFetchX509Refused(t *testing.T) {
	a, c := start(t)
	a.Set(1, spiffeid.RequireFromString("spiffe://example.org/web"))
	a.Configure(func(a *fakeagent.Agent) {
		a.Refuse = status.Error(codes.PermissionDenied, "caller is not\nauthorized")
	})
	_, _, err := c.FetchX509(ctx(t, 10*time.Second), 1, Wait{})
	if !errors.Is(err, ErrNotAuthorized) {
		t.Fatalf("error = %v, want ErrNotAuthorized", err)
	}
	msg := err.Error()
	for _, want := range []string{"authorized_delegates", c.Socket(), "caller is not authorized", "unix:uid:"} {
		if !strings.Contains(msg, want) {
			t.Fatalf("error %q does not contain %q", msg, want)
		}
	}
	if errors.Is(err, ErrUnavailable) {
		t.Fatal("refusal reported as unavailable")
	}

	a.Configure(func(a *fakeagent.Agent) { a.Refuse = status.Error(codes.Unauthenticated, "who?") })
	if _, _, err := c.FetchX509(ctx(t, 10*time.Second), 1, Wait{}); !errors.Is(err, ErrNotAuthorized) {
		t.Fatalf("Unauthenticated: error = %v, want ErrNotAuthorized", err)
	}

	a.Configure(func(a *fakeagent.Agent) { a.Refuse = status.Error(codes.Internal, "boom") })
	_, _, err = c.FetchX509(ctx(t, 10*time.Second), 1, Wait{})
	if err == nil || errors.Is(err, ErrNotAuthorized) || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "Internal: boom") {
		t.Fatalf("Internal: error = %v", err)
	}
}

func TestFetchX509MissingSocket(t *testing.T) {
	socket := socketPath(t)
	c, err := New(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _, err = c.FetchX509(ctx(t, 10*time.Second), 1, Wait{})
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("error = %v, want ErrUnavailable", err)
	}
	for _, want := range []string{"admin_socket_path", socket, "is missing"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not contain %q", err, want)
		}
	}
}

func TestFetchX509SocketNotServed(t *testing.T) {
	// A stale socket file nobody listens on: present, but not answering.
	socket := socketPath(t)
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	c, err := New(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _, err = c.FetchX509(ctx(t, 10*time.Second), 1, Wait{})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "does not answer") {
		t.Fatalf("error = %v, want ErrUnavailable 'does not answer'", err)
	}
}

func TestFetchX509Hang(t *testing.T) {
	a, c := start(t)
	a.Configure(func(a *fakeagent.Agent) { a.Hang = true })
	begin := time.Now()
	_, _, err := c.FetchX509(ctx(t, 200*time.Millisecond), 1, Wait{})
	if err == nil || !strings.Contains(err.Error(), "did not answer in time") {
		t.Fatalf("error = %v, want 'did not answer in time'", err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v does not wrap context.DeadlineExceeded", err)
	}
	if d := time.Since(begin); d > 5*time.Second {
		t.Fatalf("FetchX509 took %s with a 200ms deadline", d)
	}
	// Streams are closed once FetchX509 returns.
	waitStreamsClosed(t, a)
}

func TestFetchX509ClosesStreams(t *testing.T) {
	a, c := start(t)
	a.Set(1, spiffeid.RequireFromString("spiffe://example.org/web"))
	if _, _, err := c.FetchX509(ctx(t, 10*time.Second), 1, Wait{}); err != nil {
		t.Fatal(err)
	}
	waitStreamsClosed(t, a)
}

func svidsFor(t *testing.T, ids ...string) []*x509svid.SVID {
	t.Helper()
	var out []*x509svid.SVID
	for _, id := range ids {
		out = append(out, &x509svid.SVID{ID: spiffeid.RequireFromString(id), Certificates: []*x509.Certificate{{}}})
	}
	return out
}

func TestSelect(t *testing.T) {
	svids := svidsFor(t, "spiffe://example.org/web", "spiffe://example.org/admin")

	s, err := Select(svids, "")
	if err != nil || s != svids[0] {
		t.Fatalf("Select default = %v, %v; want the first", s, err)
	}
	s, err = Select(svids, "spiffe://example.org/admin")
	if err != nil || s != svids[1] {
		t.Fatalf("Select admin = %v, %v; want the second", s, err)
	}
	s, err = Select(svids, "spiffe://example.org/root")
	if err == nil {
		t.Fatalf("Select of an ID not returned = %v", s.ID)
	}
	for _, want := range []string{"spiffe_id spiffe://example.org/root", "(spiffe://example.org/web, spiffe://example.org/admin)"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not contain %q", err, want)
		}
	}
	// A prefix or a different trust domain is not a match.
	for _, want := range []string{"spiffe://example.org/we", "spiffe://example.org/web/", "spiffe://other.org/web"} {
		if s, err := Select(svids, want); err == nil {
			t.Fatalf("Select(%q) = %v", want, s.ID)
		}
	}
	if _, err := Select(nil, ""); !errors.Is(err, ErrNoIdentity) {
		t.Fatalf("Select(nil) error = %v, want ErrNoIdentity", err)
	}
	if _, err := Select(nil, "spiffe://example.org/web"); !errors.Is(err, ErrNoIdentity) {
		t.Fatalf("Select(nil, id) error = %v, want ErrNoIdentity", err)
	}
}
