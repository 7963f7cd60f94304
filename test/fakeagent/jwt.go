package fakeagent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// jwtKeyID names the fake agent's one JWT signing key.
const jwtKeyID = "fakeagent"

// FetchJWTSVIDs implements the API: one token per identity of the pid,
// signed with the agent's JWT key, for the audiences asked.
func (a *Agent) FetchJWTSVIDs(ctx context.Context, req *delegatedidentityv1.FetchJWTSVIDsRequest) (*delegatedidentityv1.FetchJWTSVIDsResponse, error) {
	a.mu.Lock()
	hold, refuse, ttl := a.JWTHold, a.Refuse, a.JWTTTL
	ids := a.identitiesOf(int(req.Pid))
	a.mu.Unlock()
	if refuse != nil {
		return nil, refuse
	}
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if len(req.Audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if len(ids) == 0 {
		return nil, status.Error(codes.PermissionDenied, "no identity issued")
	}
	if ttl == 0 {
		ttl = 5 * time.Minute
	}
	key, err := a.jwtSigner()
	if err != nil {
		return nil, err
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", jwtKeyID))
	if err != nil {
		return nil, err
	}
	resp := &delegatedidentityv1.FetchJWTSVIDsResponse{}
	now := time.Now()
	for _, id := range ids {
		tok, err := jwt.Signed(signer).Claims(jwt.Claims{
			Subject:  id.String(),
			Audience: req.Audience,
			IssuedAt: jwt.NewNumericDate(now),
			Expiry:   jwt.NewNumericDate(now.Add(ttl)),
			// A fresh ID per call: two calls never return the same token.
			ID: fmt.Sprint(now.UnixNano()),
		}).Serialize()
		if err != nil {
			return nil, err
		}
		resp.Svids = append(resp.Svids, &types.JWTSVID{
			Token:     tok,
			Id:        &types.SPIFFEID{TrustDomain: id.TrustDomain().Name(), Path: id.Path()},
			IssuedAt:  now.Unix(),
			ExpiresAt: now.Add(ttl).Unix(),
		})
	}
	return resp, nil
}

// SubscribeToJWTBundles implements the API: the trust domain's JWKS, sent
// again after each Rotate.
func (a *Agent) SubscribeToJWTBundles(_ *delegatedidentityv1.SubscribeToJWTBundlesRequest, stream delegatedidentityv1.DelegatedIdentity_SubscribeToJWTBundlesServer) error {
	for {
		refuse, hang, changed := a.wait(stream.Context())
		if refuse != nil {
			return refuse
		}
		if !hang {
			key, err := a.jwtSigner()
			if err != nil {
				return err
			}
			jwks, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: jwtKeyID, Use: "jwt-svid"}}})
			if err != nil {
				return err
			}
			if err := stream.Send(&delegatedidentityv1.SubscribeToJWTBundlesResponse{Bundles: map[string][]byte{a.TrustDomain.IDString(): jwks}}); err != nil {
				return err
			}
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}

// RotateJWTKey replaces the JWT signing key (a JWT authority rotation):
// the bundle streams send the new JWKS, so a test can tell a JWT bundle
// file written from the stream from one carried over.
func (a *Agent) RotateJWTKey() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.jwtKey = key
	a.mu.Unlock()
	a.Rotate()
	return nil
}

// jwtSigner returns the agent's JWT signing key, made on first use.
func (a *Agent) jwtSigner() (*ecdsa.PrivateKey, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.jwtKey == nil {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		a.jwtKey = key
	}
	return a.jwtKey, nil
}
