package render

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

func TestNamesOf(t *testing.T) {
	classic := annotations.Delivery{SVIDFileName: "a", KeyFileName: "b", BundleFileName: "c"}
	if got, want := NamesOf(classic), (Names{SVID: "a", Key: "b", Bundle: "c", TrustBundleSuffix: annotations.TrustBundleSuffix}); got != want {
		t.Errorf("classic: %+v, want %+v", got, want)
	}
	classic.CredentialBundleFileName, classic.IncludeFederatedDomains = "d", true
	if got := NamesOf(classic); got.CredentialBundle != "d" || !got.IncludeFederated || got.Redact {
		t.Errorf("credential bundle, include_federated_domains: %+v", got)
	}
	want := Names{CredentialBundle: annotations.SPIFFEFSCredentialBundle, TrustBundleSuffix: annotations.SPIFFEFSTrustBundleSuffix, Redact: true}
	if got := NamesOf(annotations.Delivery{Layout: annotations.LayoutSPIFFEFS}); got != want {
		t.Errorf("spiffe-fs: %+v, want %+v", got, want)
	}
}

// TestRedact: a trust bundle file the generation on disk has and the new
// set lacks comes back empty; other files and present ones are untouched.
func TestRedact(t *testing.T) {
	const sfx = ".spiffe-trust-bundle.x509.pem"
	old := []files.File{
		{Name: "credential-bundle.private-key.x509.pem", Data: []byte("k"), Mode: files.KeyMode},
		{Name: "a.test" + sfx, Data: []byte("a"), Mode: files.CertMode},
		{Name: "b.test" + sfx, Data: []byte("b"), Mode: files.CertMode},
	}
	if got := redact(nil, old[:1], sfx); len(got) != 1 {
		t.Fatalf("nothing on disk yet: %d files", len(got))
	}
	onDisk := []string{old[2].Name, old[0].Name, old[1].Name}
	got := redact(onDisk, []files.File{old[0], old[2]}, sfx)
	if len(got) != 3 || got[2].Name != "a.test"+sfx || len(got[2].Data) != 0 || got[2].Mode != files.CertMode {
		t.Fatalf("redact = %+v, want b kept and a emptied", got)
	}
	if got := redact(onDisk, old, sfx); len(got) != 3 {
		t.Fatalf("nothing withdrawn: %d files", len(got))
	}
}

// generation is a delivery's current generation in memory: what it
// holds, and the mode each file was asked for with.
type generation struct {
	files   map[string][]byte
	asked   map[string]os.FileMode
	listErr error
}

func (g *generation) List() ([]string, error) {
	if g.listErr != nil {
		return nil, g.listErr
	}
	return slices.Collect(maps.Keys(g.files)), nil
}

func (g *generation) File(name string, mode os.FileMode) (files.File, error) {
	if g.asked == nil {
		g.asked = map[string]os.FileMode{}
	}
	g.asked[name] = mode
	b, ok := g.files[name]
	if !ok {
		return files.File{}, fmt.Errorf("reading %s: %w", name, fs.ErrNotExist)
	}
	return files.File{Name: name, Data: b, Mode: mode}, nil
}

// fileNames lists fs's names in order.
func fileNames(fs []files.File) []string {
	names := make([]string, len(fs))
	for i, f := range fs {
		names[i] = f.Name
	}
	return names
}

// TestDelivery: the X.509 files as NamesOf names them, then the JWT files;
// on a rotation, what was not received yet carried over from the current
// generation with its mode, and the withdrawn trust domains of a layout
// that redacts kept empty; a first delivery neither carries nor redacts.
func TestDelivery(t *testing.T) {
	ca := newCA(t, "example.org")
	svid := ca.svid(t, "spiffe://example.org/web")
	set := x509bundle.NewSet(ca.bundle())
	d := annotations.Delivery{SVIDFileName: "svid.pem", KeyFileName: "key.pem", BundleFileName: "bundle.pem",
		JWTSVIDs: []*annotations.JWTSVID{{Audience: "db", FileName: "db.token"}}, JWTBundleFileName: "jwt.json"}
	jwt := &agent.JWT{Audiences: [][]string{{"db"}}, SVIDs: [][]*agent.JWTSVID{{{ID: svid.ID, Token: "T"}}}}
	jwks := agent.JWTBundles{ca.td: []byte(`{"keys":[]}`)}

	out, err := Delivery(d, Input{SVID: svid, Bundles: set, JWT: jwt, JWTBundles: jwks})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fileNames(out), []string{"svid.pem", "key.pem", "bundle.pem", "example.org.trust-bundle.pem", "db.token", "jwt.json"}; !slices.Equal(got, want) {
		t.Fatalf("first delivery: %q, want %q", got, want)
	}
	if m := filesByName(t, out); string(m["db.token"].Data) != "T" || m["db.token"].Mode != files.KeyMode || m["jwt.json"].Mode != files.CertMode {
		t.Fatalf("JWT files %+v %+v", m["db.token"], m["jwt.json"])
	}

	// A rotation before the refresher received any JWT material.
	cur := &generation{files: map[string][]byte{"db.token": []byte("old token"), "jwt.json": []byte("old jwks")}}
	out, err = Delivery(d, Input{SVID: svid, Bundles: set, Current: cur})
	if err != nil {
		t.Fatal(err)
	}
	m := filesByName(t, out)
	if string(m["db.token"].Data) != "old token" || string(m["jwt.json"].Data) != "old jwks" {
		t.Fatalf("carried over %q and %q", m["db.token"].Data, m["jwt.json"].Data)
	}
	if cur.asked["db.token"] != files.KeyMode || cur.asked["jwt.json"] != files.CertMode {
		t.Fatalf("carried over with modes %v", cur.asked)
	}
	// Nothing to carry over: a JWT error, with the reading's cause.
	_, err = Delivery(d, Input{SVID: svid, Bundles: set, JWTBundles: jwks, Current: &generation{}})
	var jerr *JWTError
	if !errors.As(err, &jerr) || !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "db.token") {
		t.Fatalf("no current token: %v", err)
	}
	// A first delivery without a token for its identity: a JWT error too.
	other := ca.svid(t, "spiffe://example.org/other")
	if _, err := Delivery(d, Input{SVID: other, Bundles: set, JWT: jwt, JWTBundles: jwks}); !errors.As(err, &jerr) || !strings.Contains(err.Error(), "jwt_svid_file_name db.token") {
		t.Fatalf("no token for %s: %v", other.ID, err)
	}
	// An X.509 error is not one.
	_, err = Delivery(d, Input{SVID: svid, Bundles: x509bundle.NewSet(), JWT: jwt, JWTBundles: jwks})
	if err == nil || errors.As(err, &jerr) {
		t.Fatalf("no bundle: %v", err)
	}
}

// TestDeliveryRedacts: spiffe-fs keeps an empty file for a trust domain
// the current generation has and the agent no longer gives; the other
// layouts, a first delivery and an unreadable generation do not.
func TestDeliveryRedacts(t *testing.T) {
	ca := newCA(t, "example.org")
	in := Input{SVID: ca.svid(t, "spiffe://example.org/web"), Bundles: x509bundle.NewSet(ca.bundle()), FederatesWith: []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString("gone.test")}}
	spiffeFS := annotations.Delivery{Layout: annotations.LayoutSPIFFEFS}
	gone := "gone.test" + annotations.SPIFFEFSTrustBundleSuffix
	cur := &generation{files: map[string][]byte{annotations.SPIFFEFSCredentialBundle: nil, gone: []byte("CA")}}

	got, err := Delivery(spiffeFS, Input{SVID: in.SVID, Bundles: in.Bundles, FederatesWith: in.FederatesWith, Current: cur})
	if err != nil {
		t.Fatal(err)
	}
	if names := fileNames(got); !slices.Equal(names, []string{annotations.SPIFFEFSCredentialBundle, "example.org" + annotations.SPIFFEFSTrustBundleSuffix, gone}) ||
		len(got[2].Data) != 0 || got[2].Mode != files.CertMode {
		t.Fatalf("rotation: %q, %s holding %q", names, gone, got[len(got)-1].Data)
	}
	for what, in := range map[string]Input{
		"first delivery":       in,
		"unreadable directory": {SVID: in.SVID, Bundles: in.Bundles, Current: &generation{listErr: fs.ErrNotExist}},
	} {
		if got, err := Delivery(spiffeFS, in); err != nil || len(got) != 2 {
			t.Errorf("%s: %q, %v; want the two files alone", what, fileNames(got), err)
		}
	}
	classic := annotations.Delivery{SVIDFileName: "svid.pem", KeyFileName: "key.pem", BundleFileName: "bundle.pem"}
	cur.files["gone.test"+annotations.TrustBundleSuffix] = []byte("CA")
	if got, err := Delivery(classic, Input{SVID: in.SVID, Bundles: in.Bundles, Current: cur}); err != nil || len(got) != 4 {
		t.Errorf("classic layout: %q, %v; want no redaction", fileNames(got), err)
	}
}
