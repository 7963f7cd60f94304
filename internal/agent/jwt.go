package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// JWTSVID is one JWT-SVID the agent issued for a process.
type JWTSVID struct {
	ID       spiffeid.ID
	Token    string
	IssuedAt time.Time
	Expiry   time.Time
}

// Lifetime is how long the token is valid in all.
func (s *JWTSVID) Lifetime() time.Duration { return s.Expiry.Sub(s.IssuedAt) }

// FetchJWTSVIDs asks for the JWT-SVIDs of the process pid for audience
// (the first is the aud claim's first), one per registration entry that
// matches it. Each token is parsed and checked (a JWT-SVID for the ID the
// agent named, for these audiences, not expired); its signature is the
// reader's to check against the JWT bundle. As with X.509 SVIDs, the
// agent attests pid when asked: the caller must check afterwards that its
// pinned process is still alive before using the answer.
func (c *Client) FetchJWTSVIDs(ctx context.Context, pid int, audience []string) ([]*JWTSVID, error) {
	resp, err := c.api.FetchJWTSVIDs(ctx, &delegatedidentityv1.FetchJWTSVIDsRequest{Pid: int32(pid), Audience: audience})
	if err != nil {
		// The agent answers a pid no entry matches with PermissionDenied,
		// which would otherwise read as this caller not being authorized.
		if st, ok := status.FromError(err); ok && st.Code() == codes.PermissionDenied && strings.Contains(st.Message(), "no identity issued") {
			return nil, fmt.Errorf("agent %s: pid %d: %w", c.socket, pid, ErrNoIdentity)
		}
		return nil, c.explain(err)
	}
	if len(resp.Svids) == 0 {
		return nil, fmt.Errorf("agent %s: pid %d: %w", c.socket, pid, ErrNoIdentity)
	}
	out := make([]*JWTSVID, 0, len(resp.Svids))
	for i, sv := range resp.Svids {
		if sv == nil || sv.Id == nil {
			return nil, fmt.Errorf("agent %s: JWT-SVID %d for pid %d is empty", c.socket, i, pid)
		}
		td, err := spiffeid.TrustDomainFromString(sv.Id.TrustDomain)
		if err != nil {
			return nil, fmt.Errorf("agent %s: JWT-SVID %d for pid %d: %w", c.socket, i, pid, err)
		}
		id, err := spiffeid.FromPath(td, sv.Id.Path)
		if err != nil {
			return nil, fmt.Errorf("agent %s: JWT-SVID %d for pid %d: %w", c.socket, i, pid, err)
		}
		parsed, err := jwtsvid.ParseInsecure(sv.Token, audience)
		if err != nil {
			return nil, fmt.Errorf("agent %s: JWT-SVID %d for pid %d: %w", c.socket, i, pid, err)
		}
		if parsed.ID != id {
			return nil, fmt.Errorf("agent %s: JWT-SVID %d for pid %d: token is for %s, the agent said %s", c.socket, i, pid, parsed.ID, id)
		}
		for _, a := range audience {
			if !slices.Contains(parsed.Audience, a) {
				return nil, fmt.Errorf("agent %s: JWT-SVID %d for pid %d: token lacks audience %q", c.socket, i, pid, a)
			}
		}
		issued := time.Unix(sv.IssuedAt, 0)
		if sv.IssuedAt == 0 || !issued.Before(parsed.Expiry) {
			// The lifetime drives renewal; without a sane issue time,
			// count it from now.
			issued = time.Now()
		}
		out = append(out, &JWTSVID{ID: id, Token: sv.Token, IssuedAt: issued, Expiry: parsed.Expiry})
	}
	return out, nil
}

// SelectJWT picks the JWT-SVID for id: a delivery's tokens are always of
// the identity its X.509 SVID names.
func SelectJWT(svids []*JWTSVID, id spiffeid.ID) (*JWTSVID, error) {
	for _, s := range svids {
		if s.ID == id {
			return s, nil
		}
	}
	ids := make([]string, len(svids))
	for i, s := range svids {
		ids[i] = s.ID.String()
	}
	return nil, fmt.Errorf("the agent returned no JWT-SVID for %s (it returned %s)", id, strings.Join(ids, ", "))
}

// JWTBundles maps each trust domain to its JWT bundle: a JWKS document as
// the agent sent it, checked to parse as one.
type JWTBundles map[spiffeid.TrustDomain][]byte

// JWTBundleStream receives JWT bundle updates: every trust domain the
// agent knows.
type JWTBundleStream struct {
	socket string
	stream grpc.ServerStreamingClient[delegatedidentityv1.SubscribeToJWTBundlesResponse]
}

// SubscribeJWTBundles opens the stream of JWT bundles.
func (c *Client) SubscribeJWTBundles(ctx context.Context) (*JWTBundleStream, error) {
	s, err := c.api.SubscribeToJWTBundles(ctx, &delegatedidentityv1.SubscribeToJWTBundlesRequest{})
	if err != nil {
		return nil, c.explain(err)
	}
	return &JWTBundleStream{socket: c.socket, stream: s}, nil
}

// Recv waits for the next set of JWT bundles.
func (s *JWTBundleStream) Recv() (JWTBundles, error) {
	resp, err := s.stream.Recv()
	if err != nil {
		return nil, explain(s.socket, err)
	}
	out := make(JWTBundles, len(resp.Bundles))
	for id, jwks := range resp.Bundles {
		// Keyed by the trust domain's SPIFFE ID (spiffe://example.org).
		td, err := spiffeid.TrustDomainFromString(id)
		if err != nil {
			return nil, fmt.Errorf("agent %s: JWT bundle trust domain %q: %w", s.socket, id, err)
		}
		if _, err := jwtbundle.Parse(td, jwks); err != nil {
			return nil, fmt.Errorf("agent %s: JWT bundle of %s: %w", s.socket, td, err)
		}
		out[td] = jwks
	}
	return out, nil
}

// JWTRequest is what a container asked of the agent besides its X.509
// SVID: tokens for some audience lists, and maybe the JWT bundles.
type JWTRequest struct {
	Audiences [][]string
	Bundles   bool
}

// JWT is the agent's answer to a JWTRequest: SVIDs[i] answers Audiences[i].
type JWT struct {
	Audiences [][]string
	SVIDs     [][]*JWTSVID
	Bundles   JWTBundles
}

// For returns the JWT-SVIDs issued for the audience list aud.
func (j *JWT) For(aud []string) []*JWTSVID {
	for i, a := range j.Audiences {
		if slices.Equal(a, aud) {
			return j.SVIDs[i]
		}
	}
	return nil
}

// FetchJWT asks for every token and the bundles at once, each in its own
// call, so that the slowest one (a token the agent must have signed by the
// server) bounds the wait. The first error wins.
func (c *Client) FetchJWT(ctx context.Context, pid int, req JWTRequest) (*JWT, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	out := &JWT{Audiences: req.Audiences, SVIDs: make([][]*JWTSVID, len(req.Audiences))}
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		if firstErr == nil {
			firstErr = err
			cancel()
		}
	}
	for i, aud := range req.Audiences {
		wg.Add(1)
		go func() {
			defer wg.Done()
			svids, err := c.FetchJWTSVIDs(ctx, pid, aud)
			if err != nil {
				fail(fmt.Errorf("JWT-SVID for audience %s: %w", strings.Join(aud, ","), err))
				return
			}
			out.SVIDs[i] = svids
		}()
	}
	if req.Bundles {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := c.SubscribeJWTBundles(ctx)
			if err == nil {
				out.Bundles, err = s.Recv()
			}
			if err != nil {
				fail(fmt.Errorf("JWT bundles: %w", err))
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	return out, nil
}
