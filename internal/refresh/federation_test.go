package refresh

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// pemCerts parses PEM certificates, nil when data is not all certificates.
func pemCerts(data []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for rest := data; len(bytes.TrimSpace(rest)) > 0; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil || blk.Type != "CERTIFICATE" {
			return nil
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil
		}
		out = append(out, c)
	}
	return out
}

// holds reports whether file name of the delivery in dir holds exactly certs.
func holds(dir, name string, certs ...*x509.Certificate) bool {
	fs, err := files.Read(dir, name)
	if err != nil {
		return false
	}
	got := pemCerts(fs[name])
	return slices.EqualFunc(got, certs, func(a, b *x509.Certificate) bool { return a.Equal(b) })
}

func gone(dir, name string) bool {
	_, err := os.Lstat(filepath.Join(dir, name))
	names, lerr := files.List(dir)
	return errors.Is(err, fs.ErrNotExist) && lerr == nil && !slices.Contains(names, name)
}

// TestFederatedBundlesFollowTheAgent: one file per trust domain, the own
// bundle file holds the own domain only, a foreign CA rotation reaches
// its file, a new federation adds one, an ended one removes it, and an
// end that happened while the refresher was down is seen at its start.
func TestFederatedBundlesFollowTheAgent(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	partnerCA := n.federate("partner.test")
	p := n.workloadProcess()
	id := n.deliver(p.Process.Pid)
	dir := n.store.DeliveryDir(id, 0)
	own := n.agent.CA()
	if !holds(dir, "svid_bundle.pem", own) {
		t.Fatal("svid_bundle.pem does not hold exactly the own trust domain's CA")
	}
	if !holds(dir, "example.org.trust-bundle.pem", own) || !holds(dir, "partner.test.trust-bundle.pem", partnerCA) {
		t.Fatal("per-trust-domain files missing or wrong after delivery")
	}

	r, stop := n.startServing()
	rotated := n.federate("partner.test")
	testhelp.Eventually(t, 5*time.Second, "foreign CA rotation written", func() bool { return holds(dir, "partner.test.trust-bundle.pem", rotated) })
	if !holds(dir, "svid_bundle.pem", own) {
		t.Fatal("a foreign CA entered svid_bundle.pem without include_federated_domains")
	}
	thirdCA := n.federate("third.test")
	testhelp.Eventually(t, 5*time.Second, "new federation's file", func() bool { return holds(dir, "third.test.trust-bundle.pem", thirdCA) })
	n.agent.Defederate("partner.test")
	testhelp.Eventually(t, 5*time.Second, "ended federation's file removed", func() bool { return gone(dir, "partner.test.trust-bundle.pem") })
	if !holds(dir, "third.test.trust-bundle.pem", thirdCA) || !holds(dir, "example.org.trust-bundle.pem", own) {
		t.Fatal("other trust bundles changed with partner.test's removal")
	}

	// Ended while no refresher ran: the next one removes it at start,
	// though nothing else changed.
	stop()
	n.agent.Defederate("third.test")
	r, _ = n.start()
	testhelp.Eventually(t, 5*time.Second, "container served again", func() bool { return r.Count() == 1 })
	testhelp.Eventually(t, 5*time.Second, "federation ended during the downtime removed", func() bool { return gone(dir, "third.test.trust-bundle.pem") })
}

// TestIncludeFederatedDomains: the merged file holds the own CA and the
// federated ones, and follows a foreign CA rotation.
func TestIncludeFederatedDomains(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	partnerCA := n.federate("partner.test")
	p := n.workloadProcess()
	d := classic
	d.IncludeFederatedDomains = true
	id := n.deliverDelivery(p.Process.Pid, true, d)
	dir := n.store.DeliveryDir(id, 0)
	own := n.agent.CA()
	if !holds(dir, "svid_bundle.pem", own, partnerCA) {
		t.Fatal("merged svid_bundle.pem does not hold own then partner CA")
	}
	n.startServing()
	rotated := n.federate("partner.test")
	testhelp.Eventually(t, 5*time.Second, "rotation in the merged file", func() bool { return holds(dir, "svid_bundle.pem", own, rotated) })
	if !holds(dir, "partner.test.trust-bundle.pem", rotated) {
		t.Fatal("per-trust-domain file not current beside the merged one")
	}
}

// TestSPIFFEFSLayout: layout spiffe-fs writes exactly the draft standard's
// files, rotates the credential bundle (its only copy of the chain), and
// redacts a withdrawn trust domain with an empty file, as the draft asks.
func TestSPIFFEFSLayout(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	partnerCA := n.federate("partner.test")
	p := n.workloadProcess()
	id := n.deliverDelivery(p.Process.Pid, true, annotations.Delivery{CertDir: "/run/secrets/spiffe", Layout: annotations.LayoutSPIFFEFS})
	dir := n.store.DeliveryDir(id, 0)
	const cb = "credential-bundle.private-key.x509.pem"
	want := []string{cb, "example.org.spiffe-trust-bundle.x509.pem", "partner.test.spiffe-trust-bundle.x509.pem"}
	list := func() []string {
		names, _ := files.List(dir)
		slices.Sort(names)
		return names
	}
	if got := list(); !slices.Equal(got, want) {
		t.Fatalf("spiffe-fs delivery holds %v, want exactly %v", got, want)
	}
	if !holds(dir, "partner.test.spiffe-trust-bundle.x509.pem", partnerCA) || !holds(dir, "example.org.spiffe-trust-bundle.x509.pem", n.agent.CA()) {
		t.Fatal("trust bundle files do not hold their domain's CA alone")
	}
	credential := func() []byte {
		fs, err := files.Read(dir, cb)
		if err != nil {
			return nil
		}
		return fs[cb]
	}
	first := credential()
	if err := checkCredentialBundle(first); err != nil {
		t.Fatalf("credential bundle: %v", err)
	}

	n.startServing()
	n.agent.Rotate()
	testhelp.Eventually(t, 5*time.Second, "credential bundle rotated", func() bool { c := credential(); return c != nil && !bytes.Equal(c, first) })
	if err := checkCredentialBundle(credential()); err != nil {
		t.Fatalf("rotated credential bundle: %v", err)
	}
	n.agent.Defederate("partner.test")
	redacted := func() bool {
		fs, err := files.Read(dir, "partner.test.spiffe-trust-bundle.x509.pem")
		return err == nil && len(fs["partner.test.spiffe-trust-bundle.x509.pem"]) == 0
	}
	testhelp.Eventually(t, 5*time.Second, "withdrawn trust domain redacted with an empty file", redacted)
	if got := list(); !slices.Equal(got, want) {
		t.Fatalf("after the redaction the delivery holds %v, want %v", got, want)
	}
	// Re-federating fills it again.
	back := n.federate("partner.test")
	testhelp.Eventually(t, 5*time.Second, "re-federated trust domain filled again", func() bool { return holds(dir, "partner.test.spiffe-trust-bundle.x509.pem", back) })
}
