package refresh

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// JWT-SVIDs do not stream: the refresher asks for them again. It asks at
// half a token's lifetime. SPIRE's agent hands out its cached token until
// somewhere between 45% and 55% of the lifetime is left, so when the
// answer is still the old token it asks again every twentieth of the
// lifetime, and the new token is in place with at least 45% of the old
// one's lifetime to spare.
const (
	jwtRetryFraction = 20
	minJWTWait       = time.Second
)

// nextJWTRenewal is how long to wait before asking for j's tokens again.
func nextJWTRenewal(j *agent.JWT, now time.Time) time.Duration {
	wait := time.Duration(-1)
	for _, svids := range j.SVIDs {
		for _, s := range svids {
			life := s.Lifetime()
			d := s.IssuedAt.Add(life / 2).Sub(now)
			if d <= 0 {
				d = life / jwtRetryFraction
			}
			if wait < 0 || d < wait {
				wait = d
			}
		}
	}
	return max(wait, minJWTWait)
}

// renewJWT keeps the container's JWT-SVIDs for auds fresh for as long as
// ctx lasts, writing every answer.
func (c *container) renewJWT(ctx context.Context, auds [][]string) {
	attempt := 0
	for {
		j, err := c.agent.client.FetchJWT(ctx, c.proc.PID, agent.JWTRequest{Audiences: auds})
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			// The agent attested the pid when asked: only if the pinned
			// process is alive now were the tokens this container's.
			if c.proc.Alive() != nil {
				<-ctx.Done()
				return
			}
			c.reportJWT(nil)
			attempt = 0
			c.update(func() { c.jwt = j })
			if !sleep(ctx, nextJWTRenewal(j, time.Now()), nil) {
				return
			}
			continue
		}
		c.reportJWT(err)
		if !sleep(ctx, backoffDelay(c.r.settings(), attempt), c.agent.Recovered()) {
			return
		}
		attempt++
	}
}

// reportJWT logs JWT-SVID renewal trouble once per kind, and its recovery
// once. The files on disk stay until a renewal succeeds.
func (c *container) reportJWT(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		if c.lastJWTErr != "" && c.lastJWTErr != "unavailable" {
			c.r.log.Info("container JWT-SVIDs renewed again", logkey.Container, c.rec.ID)
		}
		c.lastJWTErr = ""
		return
	}
	kind := errKind(err)
	if kind == c.lastJWTErr {
		return
	}
	c.lastJWTErr = kind
	if kind == "unavailable" {
		return
	}
	c.r.log.Warn("container JWT-SVIDs", logkey.Container, c.rec.ID, logkey.PID, c.proc.PID, logkey.Error, fmt.Errorf("%w; keeping the current tokens", err))
}

// generation is a delivery directory, whose current generation a
// rotation replaces. What the refresher has not received yet (it asks for
// tokens and opens the bundle stream when it starts serving a container)
// is carried over from it, so that an X.509 rotation never drops a token
// file; a layout that redacts learns from it which trust domains went.
type generation string

// List names the files of the current generation.
func (g generation) List() ([]string, error) { return files.List(string(g)) }

// File reads file name of the current generation, to write it again.
func (g generation) File(name string, mode os.FileMode) (files.File, error) {
	cur, err := files.Read(string(g), name)
	if err != nil {
		return files.File{}, fmt.Errorf("%s not received from the agent yet, and the current one is unreadable: %w", filepath.Join(string(g), name), err)
	}
	return files.File{Name: name, Data: cur[name], Mode: mode}, nil
}

func recordDeliveries(rec statedir.Record) []annotations.Delivery {
	ds := make([]annotations.Delivery, len(rec.Deliveries))
	for i, d := range rec.Deliveries {
		ds[i] = d.Delivery
	}
	return ds
}

// wantsJWTBundles reports whether any delivery of rec writes JWT bundles.
func wantsJWTBundles(rec statedir.Record) bool {
	_, bundles := annotations.JWTRequests(recordDeliveries(rec))
	return bundles
}

// runJWTBundles follows the agent's JWT bundles until ctx ends, calling
// onBundles after each change. It runs once per agent, from the first
// container that asks for JWT bundles; reachability is the X.509 bundle
// stream's to report.
func (a *agentConn) runJWTBundles(ctx context.Context, onBundles func(*agentConn)) {
	if a.client == nil {
		return
	}
	attempt := 0
	for ctx.Err() == nil {
		stream, err := a.client.SubscribeJWTBundles(ctx)
		for err == nil {
			var b agent.JWTBundles
			if b, err = stream.Recv(); err != nil {
				break
			}
			attempt = 0
			a.mu.Lock()
			a.jwtBundles = b
			a.mu.Unlock()
			onBundles(a)
		}
		if ctx.Err() != nil {
			return
		}
		if !sleep(ctx, backoffDelay(a.settings(), attempt), a.Recovered()) {
			return
		}
		attempt++
	}
}

// JWTBundles returns the latest JWT bundles, nil before the first.
func (a *agentConn) JWTBundles() agent.JWTBundles {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.jwtBundles
}
