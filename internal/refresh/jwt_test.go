package refresh

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// A token is asked for again at half its lifetime; one the agent handed
// back unchanged past that point, every twentieth of its lifetime; the
// earliest of a container's tokens decides; never more often than 1 s.
func TestNextJWTRenewal(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_000_000, 0)
	tok := func(issuedAgo, life time.Duration) *agent.JWTSVID {
		return &agent.JWTSVID{IssuedAt: now.Add(-issuedAgo), Expiry: now.Add(-issuedAgo + life)}
	}
	jwt := func(ts ...*agent.JWTSVID) *agent.JWT { return &agent.JWT{SVIDs: [][]*agent.JWTSVID{ts}} }
	cases := []struct {
		name string
		j    *agent.JWT
		want time.Duration
	}{
		{"fresh", jwt(tok(0, 2*time.Minute)), time.Minute},
		{"a third used", jwt(tok(40*time.Second, 2*time.Minute)), 20 * time.Second},
		{"past half: agent kept its cached one", jwt(tok(65*time.Second, 2*time.Minute)), 6 * time.Second},
		{"earliest wins", jwt(tok(0, time.Hour), tok(0, 2*time.Minute)), time.Minute},
		{"tiny lifetime", jwt(tok(0, time.Second)), time.Second},
	}
	for _, c := range cases {
		if got := nextJWTRenewal(c.j, now); got != c.want {
			t.Errorf("%s: next renewal in %s, want %s", c.name, got, c.want)
		}
	}
}

// deliverJWT does what the hook does for a delivery with a token and the
// JWT bundles, and returns the container id.
func (n *node) deliverJWT(pid int) string {
	n.t.Helper()
	d := classic
	d.JWTSVIDs = []*annotations.JWTSVID{{Audience: "db", FileName: "jwt.token"}}
	d.JWTBundleFileName = "jwt_bundle.json"
	return n.deliverDelivery(pid, true, d)
}

func (n *node) token(id string) string {
	n.t.Helper()
	fs, err := files.Read(n.store.DeliveryDir(id, 0), "jwt.token")
	if err != nil {
		n.t.Fatal(err)
	}
	return string(fs["jwt.token"])
}

// TestJWTRefresh (fake agent): an X.509 rotation before the refresher has
// its own token keeps the hook's token (carried over, never dropped);
// tokens are then renewed at half their lifetime, each before the one it
// replaces expires.
func TestJWTRefresh(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	const ttl = 4 * time.Second
	hold := make(chan struct{})
	n.agent.Configure(func(a *fakeagent.Agent) { a.JWTTTL = ttl })
	p := n.workloadProcess()
	id := n.deliverJWT(p.Process.Pid)
	first := n.token(id)
	n.agent.Configure(func(a *fakeagent.Agent) { a.JWTHold = hold })
	n.startServing()

	// The refresher's first token request waits at the agent; meanwhile
	// the certificate rotates and the token file must survive it.
	before := n.cert(id)
	n.agent.Rotate()
	testhelp.Eventually(t, 5*time.Second, "certificate rotated", func() bool { return !bytes.Equal(n.cert(id), before) })
	if got := n.token(id); got != first {
		t.Fatalf("the X.509 rotation changed the token file to %q", got)
	}
	if _, err := files.Read(n.store.DeliveryDir(id, 0), "jwt_bundle.json"); err != nil {
		t.Fatalf("the X.509 rotation dropped the JWT bundle file: %v", err)
	}

	close(hold)
	n.agent.Configure(func(a *fakeagent.Agent) { a.JWTHold = nil })
	tokens := []string{first}
	expiry := map[string]time.Time{}
	parse := func(tok string) time.Time {
		s, err := jwtsvid.ParseInsecure(tok, []string{"db"})
		if err != nil {
			t.Fatalf("token file holds no JWT-SVID for audience db: %v", err)
		}
		if s.ID != workload {
			t.Fatalf("token for %s, want %s", s.ID, workload)
		}
		return s.Expiry
	}
	expiry[first] = parse(first)
	deadline := time.Now().Add(4 * ttl)
	for len(tokens) < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("after %s only %d tokens", 4*ttl, len(tokens))
		}
		tok := n.token(id)
		if tok != tokens[len(tokens)-1] {
			// Expiry has one-second resolution: compare with a second's slack.
			if old := expiry[tokens[len(tokens)-1]]; !time.Now().Before(old.Add(time.Second)) {
				t.Fatalf("token %d appeared after the old one expired", len(tokens))
			}
			expiry[tok] = parse(tok)
			tokens = append(tokens, tok)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if strings.Contains(n.logs.String(), "level=WARN") {
		t.Errorf("warnings logged:\n%s", n.logs.String())
	}
}
