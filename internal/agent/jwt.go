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
	raw, err := c.api.fetchJWTSVIDs(ctx, pid, audience)
	if err != nil {
		return nil, c.api.explain(err, pid)
	}
	if len(raw) == 0 {
		return nil, fmt.Errorf("agent %s: pid %d: %w", c.socket, pid, ErrNoIdentity)
	}
	out := make([]*JWTSVID, 0, len(raw))
	for i, sv := range raw {
		if sv.id == "" {
			return nil, fmt.Errorf("agent %s: JWT-SVID %d for pid %d is empty", c.socket, i, pid)
		}
		id, err := spiffeid.FromString(sv.id)
		if err != nil {
			return nil, fmt.Errorf("agent %s: JWT-SVID %d for pid %d: %w", c.socket, i, pid, err)
		}
		parsed, err := jwtsvid.ParseInsecure(sv.token, audience)
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
		issued := time.Unix(sv.issuedAt, 0)
		if sv.issuedAt == 0 {
			// The Broker API does not say; the token's iat does.
			if iat, ok := parsed.Claims["iat"].(float64); ok {
				issued = time.Unix(int64(iat), 0)
			}
		}
		if issued.Unix() == 0 || !issued.Before(parsed.Expiry) {
			// The lifetime drives renewal; without a sane issue time,
			// count it from now.
			issued = time.Now()
		}
		out = append(out, &JWTSVID{ID: id, Token: sv.token, IssuedAt: issued, Expiry: parsed.Expiry})
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
	c    *Client
	recv func() (map[string][]byte, error)
}

// SubscribeJWTBundles opens the stream of JWT bundles. As with
// SubscribeX509Bundles, the Broker API asks on behalf of this process.
func (c *Client) SubscribeJWTBundles(ctx context.Context) (*JWTBundleStream, error) {
	return c.subscribeJWTBundles(ctx, selfPID())
}

func (c *Client) subscribeJWTBundles(ctx context.Context, pid int) (*JWTBundleStream, error) {
	recv, err := c.api.subscribeJWTBundles(ctx, pid)
	if err != nil {
		return nil, c.api.explain(err, 0)
	}
	return &JWTBundleStream{c: c, recv: recv}, nil
}

// Recv waits for the next set of JWT bundles.
func (s *JWTBundleStream) Recv() (JWTBundles, error) {
	raw, err := s.recv()
	if err != nil {
		return nil, s.c.api.explain(err, 0)
	}
	out := make(JWTBundles, len(raw))
	for id, jwks := range raw {
		// Keyed by the trust domain's SPIFFE ID (spiffe://example.org).
		td, err := spiffeid.TrustDomainFromString(id)
		if err != nil {
			return nil, fmt.Errorf("agent %s: JWT bundle trust domain %q: %w", s.c.socket, id, err)
		}
		if _, err := jwtbundle.Parse(td, jwks); err != nil {
			return nil, fmt.Errorf("agent %s: JWT bundle of %s: %w", s.c.socket, td, err)
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
			// Asked on behalf of the container itself (the Broker API
			// scopes bundles to the workload referenced).
			s, err := c.subscribeJWTBundles(ctx, pid)
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
