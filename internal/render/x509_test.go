package render

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

type testCA struct {
	td   spiffeid.TrustDomain
	key  crypto.Signer
	cert *x509.Certificate
}

func newCA(t *testing.T, td string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	trust := spiffeid.RequireTrustDomainFromString(td)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: td + " CA"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{trust.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{td: trust, key: key, cert: cert}
}

func (ca *testCA) svid(t *testing.T, id string) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		URIs:         []*url.URL{spiffeid.RequireFromString(id).URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	s, err := x509svid.ParseRaw(der, pkcs8)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (ca *testCA) bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})
}

var testNames = Names{SVID: "cert.pem", Key: "key.pem", Bundle: "ca.pem"}

func filesByName(t *testing.T, fs []files.File) map[string]files.File {
	t.Helper()
	m := map[string]files.File{}
	for _, f := range fs {
		if _, dup := m[f.Name]; dup {
			t.Fatalf("file %s twice", f.Name)
		}
		m[f.Name] = f
	}
	return m
}

func TestIdentity(t *testing.T) {
	ca := newCA(t, "example.org")
	svid := ca.svid(t, "spiffe://example.org/web")
	set := x509bundle.NewSet(ca.bundle())

	fs, err := identity(testNames, svid, set, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(fs) != 3 {
		t.Fatalf("identity returned %d files", len(fs))
	}
	m := filesByName(t, fs)
	cert, key, bundle := m["cert.pem"], m["key.pem"], m["ca.pem"]
	if cert.Mode != 0o644 || key.Mode != 0o600 || bundle.Mode != 0o644 {
		t.Fatalf("modes cert %v key %v bundle %v", cert.Mode, key.Mode, bundle.Mode)
	}

	parsed, err := x509svid.Parse(cert.Data, key.Data)
	if err != nil {
		t.Fatalf("x509svid.Parse of the written files: %v", err)
	}
	if parsed.ID != svid.ID || !parsed.Certificates[0].Equal(svid.Certificates[0]) {
		t.Fatalf("parsed SVID %s does not match %s", parsed.ID, svid.ID)
	}
	if blk, _ := pem.Decode(key.Data); blk == nil || blk.Type != "PRIVATE KEY" {
		t.Fatalf("key is not a PKCS#8 PEM block: %q", key.Data)
	}
	if bytes.Contains(cert.Data, []byte("PRIVATE KEY")) || bytes.Contains(bundle.Data, []byte("PRIVATE KEY")) {
		t.Fatal("a private key leaked into a public file")
	}

	b, err := x509bundle.Parse(ca.td, bundle.Data)
	if err != nil {
		t.Fatalf("x509bundle.Parse of the written bundle: %v", err)
	}
	auth := b.X509Authorities()
	if len(auth) != 1 || !auth[0].Equal(ca.cert) {
		t.Fatalf("bundle authorities = %d, want the CA", len(auth))
	}
	// The written SVID verifies against the written bundle.
	if _, _, err := x509svid.Verify(parsed.Certificates, x509bundle.NewSet(b)); err != nil {
		t.Fatalf("written SVID does not verify against written bundle: %v", err)
	}
}

// pemCerts parses every block of data as a certificate.
func pemCerts(t *testing.T, data []byte) []*x509.Certificate {
	t.Helper()
	var certs []*x509.Certificate
	for _, blk := range strictBlocks(t, data) {
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil || blk.Type != "CERTIFICATE" {
			t.Fatalf("%s block: %v", blk.Type, err)
		}
		certs = append(certs, c)
	}
	return certs
}

func TestIdentityFederation(t *testing.T) {
	ca := newCA(t, "example.org")
	fed := newCA(t, "partner.test")
	fed2 := newCA(t, "another.test")
	other := newCA(t, "unrelated.test")
	svid := ca.svid(t, "spiffe://example.org/web")
	set := x509bundle.NewSet(ca.bundle(), fed.bundle(), fed2.bundle(), other.bundle())
	// An unknown federated domain and the own domain named again are
	// skipped; unrelated ones are never included.
	federates := []spiffeid.TrustDomain{
		fed.td,
		spiffeid.RequireTrustDomainFromString("missing.test"),
		ca.td,
		fed2.td,
		fed.td,
	}
	names := testNames
	names.TrustBundleSuffix = ".trust-bundle.pem"

	// Default: the bundle file holds the own trust domain only; one file
	// per trust domain, each holding that domain's CA alone.
	fs, err := identity(names, svid, set, federates)
	if err != nil {
		t.Fatal(err)
	}
	m := filesByName(t, fs)
	if c := pemCerts(t, m["ca.pem"].Data); len(c) != 1 || !c[0].Equal(ca.cert) {
		t.Fatalf("ca.pem holds %d certificates, want the own CA only", len(c))
	}
	want := map[string]*x509.Certificate{
		"example.org.trust-bundle.pem":  ca.cert,
		"partner.test.trust-bundle.pem": fed.cert,
		"another.test.trust-bundle.pem": fed2.cert,
	}
	if len(fs) != 3+len(want) {
		t.Fatalf("identity returned %d files, want the three and %d trust bundles", len(fs), len(want))
	}
	for name, cert := range want {
		f, ok := m[name]
		if !ok {
			t.Fatalf("no %s", name)
		}
		if c := pemCerts(t, f.Data); len(c) != 1 || !c[0].Equal(cert) || f.Mode != files.CertMode {
			t.Fatalf("%s holds %d certificates (mode %v), want its own CA alone", name, len(c), f.Mode)
		}
	}
	// The agent's order does not change the files.
	slices.Reverse(federates)
	again, err := identity(names, svid, set, federates)
	if err != nil || !slices.EqualFunc(fs[1:], again[1:], func(a, b files.File) bool { return a.Name == b.Name && bytes.Equal(a.Data, b.Data) }) {
		t.Fatalf("federatesWith order changed the files (%v)", err)
	}

	// include_federated_domains: own CA first, then the federated ones in
	// name order.
	names.IncludeFederated = true
	fs, err = identity(names, svid, set, federates)
	if err != nil {
		t.Fatal(err)
	}
	c := pemCerts(t, filesByName(t, fs)["ca.pem"].Data)
	if len(c) != 3 || !c[0].Equal(ca.cert) || !c[1].Equal(fed2.cert) || !c[2].Equal(fed.cert) {
		t.Fatalf("merged bundle holds %d certificates, want own, another.test, partner.test", len(c))
	}

	// A federation that ended: its bundle is gone from the agent's set.
	fs, err = identity(names, svid, x509bundle.NewSet(ca.bundle(), fed2.bundle()), federates)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := filesByName(t, fs)["partner.test.trust-bundle.pem"]; ok || len(fs) != 5 {
		t.Fatalf("after partner.test's bundle went away: %d files, partner.test's still there: %v", len(fs), ok)
	}
	// No suffix, no per-trust-domain files.
	if fs, _ := identity(testNames, svid, set, federates); len(fs) != 3 {
		t.Fatalf("without a suffix: %d files", len(fs))
	}
}

func TestIdentityMissingBundle(t *testing.T) {
	ca := newCA(t, "example.org")
	other := newCA(t, "other.test")
	svid := ca.svid(t, "spiffe://example.org/web")

	fs, err := identity(testNames, svid, x509bundle.NewSet(other.bundle()), nil)
	if err == nil {
		t.Fatalf("identity() = %d files, want error", len(fs))
	}
	for _, want := range []string{"no bundle for trust domain example.org", "spiffe://example.org/web"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not contain %q", err, want)
		}
	}
	if _, err := identity(testNames, svid, x509bundle.NewSet(), nil); err == nil {
		t.Fatal("empty bundle set: no error")
	}
}

// strictBlocks decodes data as PEM and fails unless it is nothing but
// header-less blocks back to back: re-encoding the blocks must give back
// exactly data.
func strictBlocks(t *testing.T, data []byte) []*pem.Block {
	t.Helper()
	var blocks []*pem.Block
	var again []byte
	for rest := data; len(rest) > 0; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			t.Fatalf("data after the last PEM block: %q", rest)
		}
		if len(blk.Headers) != 0 {
			t.Fatalf("%s block has PEM headers %v", blk.Type, blk.Headers)
		}
		blocks = append(blocks, blk)
		again = append(again, pem.EncodeToMemory(blk)...)
	}
	if !bytes.Equal(again, data) {
		t.Fatalf("data between or around PEM blocks:\n%s", data)
	}
	return blocks
}

func TestIdentityCredentialBundle(t *testing.T) {
	ca := newCA(t, "example.org")
	svid := ca.svid(t, "spiffe://example.org/web")
	// An intermediate, so that the chain order is checked too.
	inter := newCA(t, "example.org")
	svid.Certificates = append(svid.Certificates, inter.cert)
	names := testNames
	names.CredentialBundle = "credential-bundle.pem"
	fs, err := identity(names, svid, x509bundle.NewSet(ca.bundle()), nil)
	if err != nil {
		t.Fatal(err)
	}
	m := filesByName(t, fs)
	cb, ok := m["credential-bundle.pem"]
	if !ok || len(fs) != 4 {
		t.Fatalf("identity returned %d files, want the three and the credential bundle", len(fs))
	}
	if cb.Mode != files.KeyMode {
		t.Fatalf("credential bundle mode %v, want %v: it holds the key", cb.Mode, os.FileMode(files.KeyMode))
	}
	blocks := strictBlocks(t, cb.Data)
	if len(blocks) != 3 || blocks[0].Type != "PRIVATE KEY" || blocks[1].Type != "CERTIFICATE" || blocks[2].Type != "CERTIFICATE" {
		t.Fatalf("blocks %d, want PRIVATE KEY, CERTIFICATE (leaf), CERTIFICATE (intermediate)", len(blocks))
	}
	if _, err := x509.ParsePKCS8PrivateKey(blocks[0].Bytes); err != nil {
		t.Fatalf("first block is not PKCS#8: %v", err)
	}
	if !bytes.Equal(blocks[1].Bytes, svid.Certificates[0].Raw) || !bytes.Equal(blocks[2].Bytes, inter.cert.Raw) {
		t.Fatal("chain is not leaf first, then the intermediate")
	}
	// One read gives a matching pair, by go-spiffe's and by crypto/tls's
	// reading (what an application would use).
	if _, err := x509svid.Parse(cb.Data, cb.Data); err != nil {
		t.Fatalf("x509svid.Parse(bundle, bundle): %v", err)
	}
	if _, err := tls.X509KeyPair(cb.Data, cb.Data); err != nil {
		t.Fatalf("tls.X509KeyPair(bundle, bundle): %v", err)
	}
	// The same key and chain as the two-file layout.
	if !bytes.Equal(cb.Data, append(append([]byte{}, m["key.pem"].Data...), m["cert.pem"].Data...)) {
		t.Fatal("credential bundle differs from key.pem followed by cert.pem")
	}

	// Alone: the credential bundle without the three classic files.
	fs, err = identity(Names{CredentialBundle: "c.pem"}, svid, x509bundle.NewSet(ca.bundle()), nil)
	if err != nil || len(fs) != 1 || fs[0].Name != "c.pem" {
		t.Fatalf("credential bundle alone: %d files, %v", len(fs), err)
	}
}

// TestBundlePEMCache: a bundle is encoded once and its PEM shared between
// deliveries; a new bundle (the agent's next update) is encoded anew.
func TestBundlePEMCache(t *testing.T) {
	ca := newCA(t, "example.org")
	b := ca.bundle()
	want, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	first, err := bundlePEM(b)
	if err != nil || !bytes.Equal(first, want) {
		t.Fatalf("bundlePEM = %q, %v; want Marshal's %q", first, err, want)
	}
	again, _ := bundlePEM(b)
	if &again[0] != &first[0] {
		t.Error("the same bundle was encoded again")
	}
	other := newCA(t, "example.org").bundle()
	o, _ := bundlePEM(other)
	if bytes.Equal(o, first) {
		t.Error("another bundle got the first one's PEM")
	}
}
