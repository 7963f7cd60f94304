package refresh

import (
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
)

// A token is asked for again at half its lifetime; one the agent handed
// back unchanged past that point, every twentieth of its lifetime; the
// earliest of a container's tokens decides; never more often than 1 s.
func TestNextJWTRenewal(t *testing.T) {
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
