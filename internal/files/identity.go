package files

import (
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Names are the three file names of a delivery.
type Names struct {
	SVID, Key, Bundle string
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
	return []File{
		{Name: n.SVID, Data: certs, Mode: CertMode},
		{Name: n.Key, Data: key, Mode: KeyMode},
		{Name: n.Bundle, Data: trust, Mode: CertMode},
	}, nil
}
