package agent

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
)

// fetchJWTWithBundle fetches pid's JWT-SVIDs for audiences with the
// JWT bundles, and returns them with the parsed example.org bundle.
func fetchJWTWithBundle(t *testing.T, c *Client, pid int, audiences [][]string) (*JWT, *jwtbundle.Bundle) {
	t.Helper()
	j, err := c.FetchJWT(ctx(t, 10*time.Second), pid, JWTRequest{Audiences: audiences, Bundles: true})
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	b, err := jwtbundle.Parse(td, j.Bundles[td])
	if err != nil {
		t.Fatalf("bundle: %v", err)
	}
	return j, b
}

func TestFetchJWT(t *testing.T) {
	a, c := start(t)
	web := spiffeid.RequireFromString("spiffe://example.org/web")
	db := spiffeid.RequireFromString("spiffe://example.org/db")
	a.Set(100, web, db)
	j, b := fetchJWTWithBundle(t, c, 100, [][]string{{"a"}, {"a", "b"}})
	for _, aud := range [][]string{{"a"}, {"a", "b"}} {
		svids := j.For(aud)
		if len(svids) != 2 {
			t.Fatalf("%d JWT-SVIDs for %q, want one per identity", len(svids), aud)
		}
		s, err := SelectJWT(svids, db)
		if err != nil {
			t.Fatal(err)
		}
		v, err := jwtsvid.ParseAndValidate(s.Token, b, aud)
		if err != nil || v.ID != db {
			t.Fatalf("token for %q: %v (%v)", aud, v, err)
		}
		if s.Lifetime() <= 0 {
			t.Fatalf("lifetime %s", s.Lifetime())
		}
	}
	if j.For([]string{"b"}) != nil {
		t.Fatal("For returned tokens for an audience list not asked")
	}
	if _, err := SelectJWT(j.For([]string{"a"}), spiffeid.RequireFromString("spiffe://example.org/other")); err == nil {
		t.Fatal("SelectJWT returned a token of another identity")
	}
}

// SPIRE answers a pid no entry matches with PermissionDenied "no identity
// issued"; that is ErrNoIdentity, not a refused caller.
func TestFetchJWTNoIdentity(t *testing.T) {
	_, c := start(t)
	_, err := c.FetchJWT(ctx(t, 10*time.Second), 4242, JWTRequest{Audiences: [][]string{{"a"}}})
	if !errors.Is(err, ErrNoIdentity) || errors.Is(err, ErrNotAuthorized) || !strings.Contains(err.Error(), "pid 4242") {
		t.Fatalf("error = %v, want ErrNoIdentity naming the pid", err)
	}
}

func TestFetchJWTRefused(t *testing.T) {
	a, c := start(t)
	a.Configure(func(a *fakeagent.Agent) { a.Refuse = status.Error(codes.PermissionDenied, "caller not authorized") })
	_, err := c.FetchJWT(ctx(t, 10*time.Second), 100, JWTRequest{Audiences: [][]string{{"a"}}})
	if !errors.Is(err, ErrNotAuthorized) {
		t.Fatalf("error = %v, want ErrNotAuthorized", err)
	}
}
