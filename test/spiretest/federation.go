package spiretest

import (
	"path/filepath"
	"testing"
)

// Federate makes s's server federate with other's trust domain: a
// federation relationship to other's bundle endpoint (Options.BundleEndpoint,
// https_spiffe profile, endpoint SPIFFE ID spiffe://<td>/spire/server),
// seeded with other's current bundle exchanged as a SPIFFE bundle document
// (`bundle show -format spiffe`), which authenticates the first fetch.
func (s *SPIRE) Federate(t testing.TB, other *SPIRE) {
	t.Helper()
	if other.BundleEndpointURL == "" {
		t.Fatalf("spiretest: Federate: %s serves no bundle endpoint (Options.BundleEndpoint)", other.TrustDomain)
	}
	doc := filepath.Join(s.Dir, "bundle-"+other.TrustDomain+".json")
	writeFile(t, doc, string(other.ServerCLI(t, "bundle", "show", "-socketPath", other.ServerSocket, "-format", "spiffe")))
	s.ServerCLI(t, "federation", "create", "-socketPath", s.ServerSocket,
		"-trustDomain", other.TrustDomain,
		"-bundleEndpointURL", other.BundleEndpointURL,
		"-bundleEndpointProfile", "https_spiffe",
		"-endpointSpiffeID", "spiffe://"+other.TrustDomain+"/spire/server",
		"-trustDomainBundlePath", doc, "-trustDomainBundleFormat", "spiffe")
}

// PrepareX509Authority makes s's server prepare its next X.509 CA, which
// adds the new CA certificate to its bundle: a CA rotation as a federated
// trust domain sees it.
func (s *SPIRE) PrepareX509Authority(t testing.TB) {
	t.Helper()
	s.ServerCLI(t, "localauthority", "x509", "prepare", "-socketPath", s.ServerSocket)
}
