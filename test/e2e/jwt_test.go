package e2e

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
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
// re-attestation of the running container matches too) with a JWT-SVID
// TTL of two minutes.
func jwtEnv(t *testing.T, jwtTTL time.Duration) *env {
	e := startEnv(t)
	e.spire.CreateEntryArgs(t, jwtID, []string{"unix:uid:0"}, "-jwtSVIDTTL", fmt.Sprint(int(jwtTTL/time.Second)))
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
	b.save(t)
	out := filepath.Join(b.dir, "out")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	root := filepath.Join(b.dir, "runc-root")
	cmd := exec.Command("runc", "--root", root, "run", "--detach", "--bundle", b.dir, b.id)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Run(); err != nil {
		t.Fatalf("runc run --detach: %v: %s", err, readFile(out))
	}
	t.Cleanup(func() { exec.Command("runc", "--root", root, "delete", "--force", b.id).Run() })
	return &looper{id: b.id, out: out}
}
