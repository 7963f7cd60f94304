package annotations

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Limits on what a delivery may ask of the agent: every JWT-SVID is one
// call to the agent (and, when not cached, to the SPIRE server) at every
// container start and every renewal.
const (
	// MaxJWTSVIDs bounds the JWT-SVIDs of one annotation, all deliveries
	// together.
	MaxJWTSVIDs = 8
	// MaxAudiences bounds the audiences of one JWT-SVID (jwt_audience and
	// jwt_extra_audiences together).
	MaxAudiences = 8
	// maxAudienceLen bounds one audience.
	maxAudienceLen = 256
)

// JWTSVID asks for one JWT-SVID, written raw to FileName.
type JWTSVID struct {
	Audience string `yaml:"jwt_audience" json:"jwt_audience"`
	// Pointers, so that a null item is refused rather than dropped.
	ExtraAudiences []*string `yaml:"jwt_extra_audiences,omitempty" json:"jwt_extra_audiences,omitempty"`
	FileName       string    `yaml:"jwt_svid_file_name" json:"jwt_svid_file_name"`
}

// Audiences returns the token's audiences: jwt_audience first, then the
// extra ones, as the agent is asked for them.
func (j *JWTSVID) Audiences() []string {
	aud := []string{j.Audience}
	for _, a := range j.ExtraAudiences {
		if a != nil {
			aud = append(aud, *a)
		}
	}
	return aud
}

// RenewSignals are the signals renew_signal may name: the ones servers use
// to reload their files, none that stops or kills a process by default
// (SIGHUP does, but only for a process without a handler, and a container's
// init ignores what it does not handle when it comes from outside its pid
// namespace).
var RenewSignals = []string{"SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH"}

// WantsJWT reports whether a delivery asks for any JWT material, so that
// a container that does not pays nothing for it.
func (d *Delivery) WantsJWT() bool {
	return len(d.JWTSVIDs) > 0 || d.JWTBundleFileName != ""
}

func (d *Delivery) checkJWT() error {
	names := []string{d.SVIDFileName, d.KeyFileName, d.BundleFileName}
	if d.CredentialBundleFileName != "" {
		names = append(names, d.CredentialBundleFileName)
	}
	if d.JWTBundleFileName != "" {
		if err := checkFileName(d.JWTBundleFileName); err != nil {
			return fmt.Errorf("jwt_bundle_file_name: %w", err)
		}
		if slices.Contains(names, d.JWTBundleFileName) {
			return fmt.Errorf("jwt_bundle_file_name %q is already the name of another file of this delivery", d.JWTBundleFileName)
		}
		names = append(names, d.JWTBundleFileName)
	}
	for i, j := range d.JWTSVIDs {
		if j == nil {
			return fmt.Errorf("jwt_svids item %d is empty", i)
		}
		if j.FileName == "" {
			return fmt.Errorf("jwt_svids item %d: jwt_svid_file_name is required", i)
		}
		if err := checkFileName(j.FileName); err != nil {
			return fmt.Errorf("jwt_svids item %d: jwt_svid_file_name: %w", i, err)
		}
		if slices.Contains(names, j.FileName) {
			return fmt.Errorf("jwt_svids item %d: jwt_svid_file_name %q is already the name of another file of this delivery", i, j.FileName)
		}
		names = append(names, j.FileName)
		if j.Audience == "" {
			return fmt.Errorf("jwt_svids item %d: jwt_audience is required", i)
		}
		if 1+len(j.ExtraAudiences) > MaxAudiences {
			return fmt.Errorf("jwt_svids item %d: %d audiences, more than the %d allowed", i, 1+len(j.ExtraAudiences), MaxAudiences)
		}
		for k, a := range j.ExtraAudiences {
			if a == nil {
				return fmt.Errorf("jwt_svids item %d: jwt_extra_audiences item %d is empty", i, k)
			}
		}
		aud := j.Audiences()
		for k, a := range aud {
			if err := checkAudience(a); err != nil {
				return fmt.Errorf("jwt_svids item %d: %w", i, err)
			}
			if slices.Contains(aud[:k], a) {
				return fmt.Errorf("jwt_svids item %d: audience %q is listed twice", i, a)
			}
		}
	}
	return nil
}

// checkAudience allows what a URI may hold (RFC 3986: unreserved,
// reserved and '%'): audiences are service names or URLs. Nothing that
// quotes, escapes or spaces, so an audience reads the same in a log line,
// a JWT claim and a shell.
func checkAudience(a string) error {
	switch {
	case a == "":
		return errors.New("an audience is empty")
	case len(a) > maxAudienceLen:
		return fmt.Errorf("audience %.40q... is longer than %d bytes", a, maxAudienceLen)
	}
	for _, r := range a {
		if !audienceChar(r) {
			return fmt.Errorf("audience %q holds %q: use letters, digits and URI characters (-._~:/?#[]@!$&'()*+,;=%%)", a, r)
		}
	}
	return nil
}

func audienceChar(r rune) bool {
	switch {
	case 'a' <= r && r <= 'z', 'A' <= r && r <= 'Z', '0' <= r && r <= '9':
		return true
	}
	return strings.ContainsRune("-._~:/?#[]@!$&'()*+,;=%", r)
}

func checkRenewSignal(sig string) error {
	if sig == "" || slices.Contains(RenewSignals, sig) {
		return nil
	}
	if !printable(sig) || len(sig) > 32 {
		return fmt.Errorf("renew_signal must be one of %s", strings.Join(RenewSignals, ", "))
	}
	return fmt.Errorf("renew_signal %q is not allowed: use one of %s", sig, strings.Join(RenewSignals, ", "))
}

// JWTRequests lists the distinct audience lists the deliveries ask tokens
// for, in order, and whether any asks for the JWT bundles.
func JWTRequests(ds []Delivery) (audiences [][]string, bundles bool) {
	for _, d := range ds {
		bundles = bundles || d.JWTBundleFileName != ""
		for _, j := range d.JWTSVIDs {
			aud := j.Audiences()
			if !slices.ContainsFunc(audiences, func(a []string) bool { return slices.Equal(a, aud) }) {
				audiences = append(audiences, aud)
			}
		}
	}
	return audiences, bundles
}
