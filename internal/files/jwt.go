package files

import (
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
)

// JWTSVID renders a JWT-SVID's file: the raw token, nothing else, readable
// by the container's user only, like the key (it is a bearer credential).
func JWTSVID(name, token string) File {
	return File{Name: name, Data: []byte(token), Mode: KeyMode}
}

// JWTBundle renders the JWT bundle file the way spiffe-helper (v0.11)
// writes it, so that applications moved off it read it unchanged: one JSON
// object keyed by trust domain name ("example.org"), each value the
// standard base64 of that trust domain's JWKS document. It holds the
// SVID's own trust domain and those it federates with, as the Workload API
// gives a workload. The keys are public: mode 0644 like the X.509 bundle.
func JWTBundle(name string, own spiffeid.TrustDomain, federatesWith []spiffeid.TrustDomain, jwks map[spiffeid.TrustDomain][]byte) (File, error) {
	doc, ok := jwks[own]
	if !ok {
		return File{}, fmt.Errorf("files: the agent sent no JWT bundle for trust domain %s", own)
	}
	out := map[string]string{own.Name(): base64.StdEncoding.EncodeToString(doc)}
	for _, td := range federatesWith {
		if doc, ok := jwks[td]; ok {
			out[td.Name()] = base64.StdEncoding.EncodeToString(doc)
		}
	}
	// encoding/json sorts map keys: the same bundles give the same bytes.
	data, err := json.Marshal(out)
	if err != nil {
		return File{}, fmt.Errorf("files: encoding JWT bundles: %w", err)
	}
	return File{Name: name, Data: data, Mode: CertMode}, nil
}

// JWTSVIDFor renders the file of one jwt_svids item of a delivery whose
// X.509 SVID is id: the token for its audiences that the agent issued for
// id, so that one delivery never mixes two identities.
func JWTSVIDFor(j *annotations.JWTSVID, id spiffeid.ID, jwt *agent.JWT) (File, error) {
	s, err := agent.SelectJWT(jwt.For(j.Audiences()), id)
	if err != nil {
		return File{}, fmt.Errorf("jwt_svid_file_name %s: %w", j.FileName, err)
	}
	return JWTSVID(j.FileName, s.Token), nil
}
