package render

import (
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

// jwtBundle renders the JWT bundle file the way spiffe-helper (v0.11)
// writes it, so that applications moved off it read it unchanged: one JSON
// object keyed by trust domain name ("example.org"), each value the
// standard base64 of that trust domain's JWKS document. It holds the
// SVID's own trust domain and those it federates with, as the Workload API
// gives a workload. The keys are public: mode 0644 like the X.509 bundle.
func jwtBundle(name string, own spiffeid.TrustDomain, federatesWith []spiffeid.TrustDomain, jwks map[spiffeid.TrustDomain][]byte) (files.File, error) {
	doc, ok := jwks[own]
	if !ok {
		return files.File{}, fmt.Errorf("files: the agent sent no JWT bundle for trust domain %s", own)
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
		return files.File{}, fmt.Errorf("files: encoding JWT bundles: %w", err)
	}
	return files.File{Name: name, Data: data, Mode: files.CertMode}, nil
}

// jwtSVIDFor renders the file of one jwt_svids item of a delivery whose
// X.509 SVID is id: the token for its audiences that the agent issued for
// id, so that one delivery never mixes two identities. The file holds the
// raw token, nothing else, readable by the container's user only, like
// the key (it is a bearer credential). A nil jwt is an answer without
// tokens.
func jwtSVIDFor(j *annotations.JWTSVID, id spiffeid.ID, jwt *agent.JWT) (files.File, error) {
	var svids []*agent.JWTSVID
	if jwt != nil {
		svids = jwt.For(j.Audiences())
	}
	s, err := agent.SelectJWT(svids, id)
	if err != nil {
		return files.File{}, fmt.Errorf("jwt_svid_file_name %s: %w", j.FileName, err)
	}
	return files.File{Name: j.FileName, Data: []byte(s.Token), Mode: files.KeyMode}, nil
}

// jwtFiles renders delivery d's JWT files for in.SVID's identity. What in
// lacks (the refresher has not received it yet) is in.Current's file,
// when there is a current generation.
func jwtFiles(d annotations.Delivery, in Input) ([]files.File, error) {
	id := in.SVID.ID
	var out []files.File
	for _, j := range d.JWTSVIDs {
		var f files.File
		var err error
		if in.JWT == nil && in.Current != nil {
			f, err = in.Current.File(j.FileName, files.KeyMode)
		} else {
			f, err = jwtSVIDFor(j, id, in.JWT)
		}
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	if d.JWTBundleFileName != "" {
		var f files.File
		var err error
		if in.JWTBundles == nil && in.Current != nil {
			f, err = in.Current.File(d.JWTBundleFileName, files.CertMode)
		} else {
			f, err = jwtBundle(d.JWTBundleFileName, id.TrustDomain(), in.FederatesWith, in.JWTBundles)
		}
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}
