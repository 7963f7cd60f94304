package e2e

import (
	"testing"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
)

// TestCompatSPIRE113: the compatibility subset on SPIRE 1.13.3, for an
// operator still on that line: hook delivery, JWT-SVIDs, rotation and an
// agent restart (TestRefresherLifecycle), with the Delegated Identity API
// (1.13 has no Broker API). The rest of the package runs on 1.15.3 only:
// running every suite on both lines would double the CI time.
func TestCompatSPIRE113(t *testing.T) {
	runAgainst(t, spiretest.V113, config.APIDelegated, compatSubset)
}

// compatSubset is what runs again on another SPIRE line or agent API:
// hook delivery of X.509 and JWT-SVIDs, rotation, and agent and
// refresher restarts.
var compatSubset = []namedTest{
	{"RuncDeliversSVID", TestRuncDeliversSVID},
	{"JWTDelivery", TestJWTDelivery},
	{"RefresherLifecycle", TestRefresherLifecycle},
}
