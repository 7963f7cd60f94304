package files

import (
	"fmt"
	"os"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Names are the file names of a delivery. An empty name is not written.
type Names struct {
	SVID, Key, Bundle string
	// CredentialBundle is the one-file layout: key, then chain (see
	// CredentialBundle).
	CredentialBundle string
}

// Modes of the identity files: only the owner reads the key.
const (
	KeyMode  = 0o600
	CertMode = 0o644
)

// Identity renders an SVID and the bundles its holder should trust (its own
// trust domain's and those it federates with) as the files of a delivery:
// the leaf and intermediates as PEM, the PKCS#8 key as PEM, and the trust
// bundle as PEM. Both inputs come from go-spiffe's parsers, so what is
// written was checked.
func Identity(n Names, svid *x509svid.SVID, bundles *x509bundle.Set, federatesWith []spiffeid.TrustDomain) ([]File, error) {
	certs, key, err := svid.Marshal()
	if err != nil {
		return nil, fmt.Errorf("files: encoding SVID %s: %w", svid.ID, err)
	}
	own, ok := bundles.Get(svid.ID.TrustDomain())
	if !ok {
		return nil, fmt.Errorf("files: the agent sent no bundle for trust domain %s of SVID %s", svid.ID.TrustDomain(), svid.ID)
	}
	trust, err := own.Marshal()
	if err != nil {
		return nil, fmt.Errorf("files: encoding bundle of %s: %w", own.TrustDomain(), err)
	}
	for _, td := range federatesWith {
		b, ok := bundles.Get(td)
		if !ok || td == own.TrustDomain() {
			continue
		}
		pem, err := b.Marshal()
		if err != nil {
			return nil, fmt.Errorf("files: encoding bundle of %s: %w", td, err)
		}
		trust = append(trust, pem...)
	}
	var out []File
	add := func(name string, data []byte, mode os.FileMode) {
		if name != "" {
			out = append(out, File{Name: name, Data: data, Mode: mode})
		}
	}
	add(n.SVID, certs, CertMode)
	add(n.Key, key, KeyMode)
	add(n.Bundle, trust, CertMode)
	add(n.CredentialBundle, CredentialBundle(key, certs), KeyMode)
	return out, nil
}

// CredentialBundle is the one-file credential of Kubernetes Pod
// Certificates (KEP-4317 credentialBundlePath) and the draft SPIFFE
// Filesystem Delivery standard: the PKCS#8 "PRIVATE KEY" block, then the
// "CERTIFICATE" blocks of the chain, leaf first, with no other block
// types, no data between blocks and no PEM headers. key and certs are
// go-spiffe's encoding of a parsed SVID, which is exactly that. It holds
// the key, so it is written with KeyMode.
func CredentialBundle(key, certs []byte) []byte {
	out := make([]byte, 0, len(key)+len(certs))
	return append(append(out, key...), certs...)
}
