package e2e

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

const jwtID = "spiffe://example.org/workload/jwt"

// jwtAnnotation asks for one token with two audiences and the JWT bundles.
const jwtAnnotation = `- cert_dir: /certs
  jwt_svids:
  - jwt_audience: https://vault.example.org
    jwt_extra_audiences: [spiffe://example.org/db]
    jwt_svid_file_name: jwt.token
  jwt_bundle_file_name: jwt_bundle.json
`

var jwtAudiences = []string{"https://vault.example.org", "spiffe://example.org/db"}

// jwtEnv registers jwtID for every uid-0 process (so the refresher's
// re-attestation of the running container matches too) with the given
// JWT-SVID TTL, and a 30 s X.509-SVID TTL, so that X.509 rotations
// interleave with token renewals.
func jwtEnv(t *testing.T, jwtTTL time.Duration) *env {
	e := startEnv(t)
	e.spire.CreateEntryArgs(t, jwtID, []string{"unix:uid:0"}, "-jwtSVIDTTL", fmt.Sprint(int(jwtTTL/time.Second)), "-x509SVIDTTL", "30")
	e.waitSynced()
	return e
}

// parseJWTBundle reads a JWT bundle file as spiffe-helper writes it: trust
// domain name -> base64 of the JWKS.
func parseJWTBundle(t *testing.T, data string) *jwtbundle.Set {
	t.Helper()
	var m map[string]string
	if err := json.Unmarshal([]byte(data), &m); err != nil {
		t.Fatalf("JWT bundle file is not a JSON object of strings: %v: %q", err, data)
	}
	set := jwtbundle.NewSet()
	for name, b64 := range m {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			t.Fatalf("JWT bundle file key %q: %v", name, err)
		}
		jwks, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			t.Fatalf("JWT bundle of %s is not base64: %v", name, err)
		}
		b, err := jwtbundle.Parse(td, jwks)
		if err != nil {
			t.Fatalf("JWT bundle of %s is not a JWKS: %v", name, err)
		}
		set.Add(b)
	}
	if _, ok := set.Get(spiffeid.RequireTrustDomainFromString(trustDomain)); !ok || len(m) != 1 {
		t.Fatalf("JWT bundle file holds %v, want exactly %s", slices.Collect(maps.Keys(m)), trustDomain)
	}
	return set
}

// checkJWT verifies token with the delivered bundles: signed by the trust
// domain's JWT authority, sub the container's SPIFFE ID, every audience
// asked for in aud.
func checkJWT(t *testing.T, token string, set *jwtbundle.Set) *jwtsvid.SVID {
	t.Helper()
	svid, err := jwtsvid.ParseAndValidate(token, set, jwtAudiences[:1])
	if err != nil {
		t.Fatalf("token does not verify with the delivered JWT bundle: %v", err)
	}
	if svid.ID.String() != jwtID {
		t.Fatalf("token sub = %s, want %s", svid.ID, jwtID)
	}
	for _, a := range jwtAudiences {
		if !slices.Contains(svid.Audience, a) {
			t.Fatalf("token aud = %v, lacks %s", svid.Audience, a)
		}
	}
	return svid
}

// TestJWTDelivery, against the real SPIRE agent: the hook writes a token
// the container reads and verifies with the delivered JWKS.
func TestJWTDelivery(t *testing.T) {
	const ttl = 2 * time.Minute
	e := jwtEnv(t, ttl)

	t.Run("hook delivers token and bundle", func(t *testing.T) {
		script := `echo "=== token ==="; cat /certs/jwt.token; echo; echo "=== end token ==="
echo "=== bundle ==="; cat /certs/jwt_bundle.json; echo; echo "=== end bundle ==="
echo "=== stat ==="; stat -L -c '%a %u %g' /certs/jwt.token /certs/jwt_bundle.json; echo "=== end stat ==="`
		b := newBundle(t, []string{"/bin/sh", "-c", script})
		b.SetProcessUID(1000)
		b.SetProcessGID(1000)
		b.AddAnnotation(annotation, jwtAnnotation)
		b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
		out, stderr, err := b.runc(t)
		if err != nil {
			t.Fatalf("runc run: %v\nstderr: %s", err, stderr)
		}
		token := strings.TrimSpace(section(t, out, "token"))
		set := parseJWTBundle(t, strings.TrimSpace(section(t, out, "bundle")))
		svid := checkJWT(t, token, set)
		t.Logf("token for %s, aud %v, expires in %s", svid.ID, svid.Audience, time.Until(svid.Expiry).Round(time.Second))
		if life := time.Until(svid.Expiry); life > ttl || life < ttl-30*time.Second {
			t.Errorf("token expires in %s, want about the entry's %s", life, ttl)
		}
		if got := strings.Fields(section(t, out, "stat")); !slices.Equal(got, []string{"600", "1000", "1000", "644", "1000", "1000"}) {
			t.Errorf("token and bundle mode/owner = %v, want 600 1000 1000 and 644 1000 1000", got)
		}
	})

}

// TestJWTRenewal, against the real SPIRE agent: with a 40 s TTL (the
// X.509-SVID's is 30 s, so rotations mix with renewals) the refresher
// replaces the container's token before the old one expires, again and
// again while the container runs; a new JWT authority reaches the bundle
// file.
func TestJWTRenewal(t *testing.T) {
	const ttl = 40 * time.Second
	e := jwtEnv(t, ttl)
	r := e.startRefresher(t)

	t.Run("refresher renews before expiry", func(t *testing.T) {
		l := e.startLooper(t, jwtAnnotation, `while :; do echo "=== tok $(cat /certs/jwt.token)"; sleep 0.5; done`)
		type seen struct {
			svid *jwtsvid.SVID
			at   time.Time
		}
		var tokens []seen
		bundle := parseJWTBundle(t, readFile(filepath.Join(e.stateDir, "containers", l.id, "0", "jwt_bundle.json")))
		certFile := filepath.Join(e.stateDir, "containers", l.id, "0", "svid.pem")
		firstCert := leafOf(t, readFile(certFile))
		// Three tokens: the hook's and two renewals, each seen by the
		// container before the one it replaced expired.
		deadline := time.Now().Add(2*ttl + 30*time.Second)
		for len(tokens) < 3 {
			if time.Now().After(deadline) {
				t.Fatalf("after %s the container saw %d tokens, want 3", 2*ttl+30*time.Second, len(tokens))
			}
			lines := strings.Split(readFile(l.out), "\n")
			for i := len(lines) - 1; i >= 0; i-- {
				tok, ok := strings.CutPrefix(lines[i], "=== tok ")
				if !ok {
					continue
				}
				if strings.TrimSpace(tok) == "" {
					t.Fatalf("the container read no token: a rewrite dropped the file\n%s", readFile(l.out))
				}
				if len(tokens) == 0 || tokens[len(tokens)-1].svid.Marshal() != tok {
					now := time.Now()
					svid := checkJWT(t, tok, bundle)
					if n := len(tokens); n > 0 {
						old := tokens[n-1].svid
						if !now.Before(old.Expiry) {
							t.Fatalf("token %d appeared at %s, after the one it replaced expired (%s)", n, now.Format(time.TimeOnly), old.Expiry.Format(time.TimeOnly))
						}
						t.Logf("token %d replaced %s before the old one expired (at %s of its %s lifetime)", n, old.Expiry.Sub(now).Round(time.Second), now.Sub(old.Expiry.Add(-ttl)).Round(time.Second), ttl)
					}
					tokens = append(tokens, seen{svid, now})
				}
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		if leafOf(t, readFile(certFile)).Equal(firstCert) {
			t.Error("the X.509 SVID never rotated meanwhile: the test did not mix X.509 rotations with token renewals")
		}
	})

	t.Run("new JWT authority reaches the bundle file", func(t *testing.T) {
		l := e.startLooper(t, jwtAnnotation, `sleep 300`)
		path := filepath.Join(e.stateDir, "containers", l.id, "0", "jwt_bundle.json")
		keys := func() int {
			b, _ := parseJWTBundle(t, readFile(path)).Get(spiffeid.RequireTrustDomainFromString(trustDomain))
			return len(b.JWTAuthorities())
		}
		before := keys()
		e.spire.ServerCLI(t, "localauthority", "jwt", "prepare", "-socketPath", e.spire.ServerSocket)
		deadline := time.Now().Add(30 * time.Second)
		for keys() <= before {
			if time.Now().After(deadline) {
				t.Fatalf("the JWT bundle file still holds %d keys 30 s after a new JWT authority was prepared; refresher log:\n%s", before, readFile(r.log))
			}
			time.Sleep(250 * time.Millisecond)
		}
	})
}

// looper is a detached runc container whose output goes to a file.
type looper struct {
	id, out string
}

// startLooper runs script in a detached annotated container.
func (e *env) startLooper(t *testing.T, ann, script string) *looper {
	t.Helper()
	b := newBundle(t, []string{"/bin/sh", "-c", script})
	b.AddAnnotation(annotation, ann)
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	return &looper{id: b.id, out: b.runDetached(t, "runc")}
}
