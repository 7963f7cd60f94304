package render

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

// The error messages here keep the "files: " they began with when this
// code lived in package files: docs/troubleshooting.md lists them so, and
// an operator's alert may match them.

// identity renders an SVID and the bundles its holder should trust (its own
// trust domain's and those it federates with) as the files of a delivery:
// the leaf and intermediates as PEM, the PKCS#8 key as PEM, the trust
// bundles as PEM, and the credential bundle. Both inputs come from
// go-spiffe's parsers, so what is written was checked. A federated trust
// domain the agent has no bundle for is left out, so a relationship that
// ended (its bundle deleted, or the entry no longer federating with it)
// drops its files at the next write.
func identity(n Names, svid *x509svid.SVID, bundles *x509bundle.Set, federatesWith []spiffeid.TrustDomain) ([]files.File, error) {
	certs, key, err := svid.Marshal()
	if err != nil {
		return nil, fmt.Errorf("files: encoding SVID %s: %w", svid.ID, err)
	}
	ownTD := svid.ID.TrustDomain()
	own, ok := bundles.Get(ownTD)
	if !ok {
		return nil, fmt.Errorf("files: the agent sent no bundle for trust domain %s of SVID %s", ownTD, svid.ID)
	}
	ownPEM, err := bundlePEM(own)
	if err != nil {
		return nil, fmt.Errorf("files: encoding bundle of %s: %w", ownTD, err)
	}
	// The federated domains, each once, in name order: the agent's order
	// may change between updates, and the files should not.
	var feds []*x509bundle.Bundle
	seen := map[spiffeid.TrustDomain]bool{ownTD: true}
	for _, td := range federatesWith {
		if b, ok := bundles.Get(td); ok && !seen[td] {
			seen[td] = true
			feds = append(feds, b)
		}
	}
	slices.SortFunc(feds, func(a, b *x509bundle.Bundle) int {
		return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
	})
	fedPEM := make([][]byte, len(feds))
	for i, b := range feds {
		if fedPEM[i], err = bundlePEM(b); err != nil {
			return nil, fmt.Errorf("files: encoding bundle of %s: %w", b.TrustDomain(), err)
		}
	}

	var out []files.File
	add := func(name string, data []byte, mode os.FileMode) {
		if name != "" {
			out = append(out, files.File{Name: name, Data: data, Mode: mode})
		}
	}
	add(n.SVID, certs, files.CertMode)
	add(n.Key, key, files.KeyMode)
	trust := ownPEM
	if n.IncludeFederated {
		trust = bytes.Join(append([][]byte{ownPEM}, fedPEM...), nil)
	}
	add(n.Bundle, trust, files.CertMode)
	add(n.CredentialBundle, CredentialBundle(key, certs), files.KeyMode)
	if n.TrustBundleSuffix != "" {
		add(trustBundleFileName(ownTD, n.TrustBundleSuffix), ownPEM, files.CertMode)
		for i, b := range feds {
			add(trustBundleFileName(b.TrustDomain(), n.TrustBundleSuffix), fedPEM[i], files.CertMode)
		}
	}
	return out, nil
}

// pemCache holds the PEM of the trust bundles encoded last. Every
// container of an agent is written from the same bundle set, and
// encoding each bundle once per container per write was about a quarter
// of a rotation's allocations at 1,000 containers. The key is the
// bundle's pointer: the agent client builds a new bundle for every
// update and nothing changes one afterwards. A few entries cover the
// own trust domain and its federated ones across one agent update.
//
// It stays a package variable where the refresher's other shared state
// became fields: it is a pure memo, bounded at 16 entries, whose answer is
// the one b.Marshal would give, so no caller can tell whether it hit; it
// holds no test seam, and tests running in parallel share it harmlessly.
// A cache per value would have to be threaded through every caller of
// Delivery for the same output.
var pemCache struct {
	sync.Mutex
	next    int
	entries [16]struct {
		b   *x509bundle.Bundle
		pem []byte
	}
}

// bundlePEM returns b's X.509 authorities as PEM, shared: callers must
// not change the slice.
func bundlePEM(b *x509bundle.Bundle) ([]byte, error) {
	pemCache.Lock()
	for _, e := range pemCache.entries {
		if e.b == b {
			pemCache.Unlock()
			return e.pem, nil
		}
	}
	pemCache.Unlock()
	data, err := b.Marshal()
	if err != nil {
		return nil, err
	}
	pemCache.Lock()
	e := &pemCache.entries[pemCache.next]
	e.b, e.pem = b, data
	pemCache.next = (pemCache.next + 1) % len(pemCache.entries)
	pemCache.Unlock()
	return data, nil
}

// redact returns fs plus an empty file for every trust bundle file (name
// ending in suffix) among have (the current generation's files) that fs
// does not hold. The draft SPIFFE Filesystem Delivery standard (section
// 2.3) asks for this: an empty file says the trust domain was withdrawn,
// while an absent one may be a remount, so a reader of the draft may keep
// trusting a domain whose file merely went away.
func redact(have []string, fs []files.File, suffix string) []files.File {
	have = slices.Sorted(slices.Values(have))
	for _, name := range have {
		if strings.HasSuffix(name, suffix) && !slices.ContainsFunc(fs, func(f files.File) bool { return f.Name == name }) {
			fs = append(fs, files.File{Name: name, Data: []byte{}, Mode: files.CertMode})
		}
	}
	return fs
}

// trustBundleFileName names trust domain td's own bundle file. Trust domain
// names hold only [a-z0-9._-] (go-spiffe checks), so the name is a plain
// file name; one starting with "." would enter the writer's reserved
// "..*" names and is not written.
func trustBundleFileName(td spiffeid.TrustDomain, suffix string) string {
	if strings.HasPrefix(td.Name(), ".") {
		return ""
	}
	return td.Name() + suffix
}

// CredentialBundle is the one-file credential of Kubernetes Pod
// Certificates (KEP-4317 credentialBundlePath) and the draft SPIFFE
// Filesystem Delivery standard: the PKCS#8 "PRIVATE KEY" block, then the
// "CERTIFICATE" blocks of the chain, leaf first, with no other block
// types, no data between blocks and no PEM headers. key and certs are
// go-spiffe's encoding of a parsed SVID, which is exactly that. It holds
// the key, so it is written with files.KeyMode.
func CredentialBundle(key, certs []byte) []byte {
	out := make([]byte, 0, len(key)+len(certs))
	return append(append(out, key...), certs...)
}
