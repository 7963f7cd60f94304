// Package render is the one rule for which files a delivery gets and what
// they hold: it turns a delivery (its annotation) and the agent's answer
// (the SVID, the bundles, the trust domains it federates with, the JWT
// material) into the files that package files writes. The hook renders a
// container's first delivery with it and the refresher every rotation, so
// that the two cannot drift apart; internal/hook's
// TestHookRefresherEquivalence runs both against the same annotations.
//
// Package files stays the writer and knows nothing of SPIFFE; this package
// knows nothing of writing.
package render

import (
	"os"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

// Names are the file names of a delivery. An empty name is not written.
type Names struct {
	SVID, Key, Bundle string
	// CredentialBundle is the one-file layout: key, then chain (see
	// CredentialBundle).
	CredentialBundle string
	// TrustBundleSuffix, when set, writes one file per trust domain the
	// SVID's holder may talk to, its own included, named
	// <trust-domain><TrustBundleSuffix>: each peer is checked against its
	// own trust domain's bundle only.
	TrustBundleSuffix string
	// IncludeFederated puts the federated trust domains' bundles into
	// Bundle after the own one (spiffe-helper's include_federated_domains),
	// for applications that take one CA file. Without it Bundle holds the
	// SVID's own trust domain only: SPIFFE says never to mix bundles.
	IncludeFederated bool
	// Redact keeps the file of a trust domain no longer trusted, empty,
	// instead of removing it (see redact).
	Redact bool
}

// NamesOf returns delivery d's file names: the spiffe-fs layout's fixed
// ones, or the annotation's.
func NamesOf(d annotations.Delivery) Names {
	if d.Layout == annotations.LayoutSPIFFEFS {
		return Names{CredentialBundle: annotations.SPIFFEFSCredentialBundle, TrustBundleSuffix: annotations.SPIFFEFSTrustBundleSuffix, Redact: true}
	}
	return Names{
		SVID: d.SVIDFileName, Key: d.KeyFileName, Bundle: d.BundleFileName,
		CredentialBundle:  d.CredentialBundleFileName,
		TrustBundleSuffix: annotations.TrustBundleSuffix,
		IncludeFederated:  bool(d.IncludeFederatedDomains),
	}
}

// Input is what one delivery's files are rendered from.
type Input struct {
	// SVID is the delivery's X.509 SVID (agent.Select picked it).
	SVID *x509svid.SVID
	// Bundles are the agent's X.509 bundles; FederatesWith, the trust
	// domains the SVID's entry federates with.
	Bundles       *x509bundle.Set
	FederatesWith []spiffeid.TrustDomain
	// JWT is the agent's answer to the container's JWT-SVID requests, and
	// JWTBundles its JWT bundles by trust domain; nil when not received.
	JWT        *agent.JWT
	JWTBundles agent.JWTBundles
	// Current is the delivery's current generation when this render
	// replaces one (the refresher's rotations), nil for a first delivery
	// (the hook, which fetched all it renders).
	Current Generation
}

// Generation is a delivery's generation on disk, which a rotation replaces.
type Generation interface {
	// List names the files it holds.
	List() ([]string, error)
	// File returns its file name, to be written again with mode.
	File(name string, mode os.FileMode) (files.File, error)
}

// JWTError is an error rendering a delivery's JWT files. Its text is the
// cause's: the callers name the delivery it belongs to, which a JWT
// error, unlike an X.509 one (it names its SVID or trust domain), does
// not say.
type JWTError struct{ Err error }

func (e *JWTError) Error() string { return e.Err.Error() }
func (e *JWTError) Unwrap() error { return e.Err }

// Delivery renders delivery d's files from in: the X.509 SVID, key and
// bundles as NamesOf(d) names them, then the JWT-SVIDs and the JWT bundle
// it asks for. On a rotation (in.Current set), JWT material not received
// yet is carried over from the current generation, so that an X.509
// rotation never drops a token file, and a layout that redacts keeps an
// empty file for each trust domain withdrawn since.
func Delivery(d annotations.Delivery, in Input) ([]files.File, error) {
	names := NamesOf(d)
	fs, err := identity(names, in.SVID, in.Bundles, in.FederatesWith)
	if err != nil {
		return nil, err
	}
	jfs, err := jwtFiles(d, in)
	if err != nil {
		return nil, &JWTError{Err: err}
	}
	fs = append(fs, jfs...)
	if names.Redact && in.Current != nil {
		// An unreadable generation has nothing to redact: the write
		// replaces it whole.
		if have, err := in.Current.List(); err == nil {
			fs = redact(have, fs, names.TrustBundleSuffix)
		}
	}
	return fs, nil
}
