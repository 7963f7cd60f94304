package render

import (
	"encoding/base64"
	"encoding/json"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

func TestJWTBundle(t *testing.T) {
	own := spiffeid.RequireTrustDomainFromString("example.org")
	fed := spiffeid.RequireTrustDomainFromString("partner.org")
	other := spiffeid.RequireTrustDomainFromString("unrelated.org")
	jwks := map[spiffeid.TrustDomain][]byte{
		own:   []byte(`{"keys":[]}`),
		fed:   []byte(`{"keys":[{"kid":"p"}]}`),
		other: []byte(`{"keys":[{"kid":"o"}]}`),
	}
	f, err := jwtBundle("b.json", own, []spiffeid.TrustDomain{fed}, jwks)
	if err != nil {
		t.Fatal(err)
	}
	if f.Name != "b.json" || f.Mode != files.CertMode {
		t.Fatalf("file %s mode %o", f.Name, f.Mode)
	}
	var m map[string]string
	if err := json.Unmarshal(f.Data, &m); err != nil {
		t.Fatal(err)
	}
	if len(m) != 2 || m["example.org"] != base64.StdEncoding.EncodeToString(jwks[own]) || m["partner.org"] != base64.StdEncoding.EncodeToString(jwks[fed]) {
		t.Fatalf("bundle file = %s: want example.org and partner.org only, keyed by name, base64 JWKS", f.Data)
	}
	// Same input, same bytes: the refresher compares them.
	for range 20 {
		g, _ := jwtBundle("b.json", own, []spiffeid.TrustDomain{fed}, jwks)
		if string(g.Data) != string(f.Data) {
			t.Fatal("jwtBundle is not deterministic")
		}
	}
	if _, err := jwtBundle("b.json", other, nil, map[spiffeid.TrustDomain][]byte{own: nil}); err == nil {
		t.Fatal("no error without the own trust domain's bundle")
	}
}

func TestJWTSVIDFor(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	mine, theirs := spiffeid.RequireFromPath(td, "/mine"), spiffeid.RequireFromPath(td, "/theirs")
	aud := "a"
	j := &annotations.JWTSVID{Audience: aud, FileName: "t"}
	jwt := &agent.JWT{
		Audiences: [][]string{{"a"}},
		SVIDs:     [][]*agent.JWTSVID{{{ID: theirs, Token: "T"}, {ID: mine, Token: "M"}}},
	}
	f, err := jwtSVIDFor(j, mine, jwt)
	if err != nil || string(f.Data) != "M" || f.Mode != files.KeyMode || f.Name != "t" {
		t.Fatalf("jwtSVIDFor = %+v, %v; want the token for %s, mode 0600", f, err, mine)
	}
	other := spiffeid.RequireFromPath(td, "/other")
	if _, err := jwtSVIDFor(j, other, jwt); err == nil {
		t.Fatal("a token for another identity was chosen")
	}
	j.ExtraAudiences = []*string{&aud}
	if _, err := jwtSVIDFor(j, mine, jwt); err == nil {
		t.Fatal("a token for other audiences was chosen")
	}
}
