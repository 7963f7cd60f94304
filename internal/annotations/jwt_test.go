package annotations

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// spiffeHelperExample is spiffe-helper's README example, as a delivery.
const spiffeHelperExample = `- cert_dir: /certs
  jwt_svids:
  - jwt_audience: your-audience
    jwt_extra_audiences: [your-extra-audience-1, your-extra-audience-2]
    jwt_svid_file_name: jwt_svid.token
  jwt_bundle_file_name: bundle.json
  renew_signal: SIGUSR1
`

func TestParseJWT(t *testing.T) {
	ds, err := Parse(Key, spiffeHelperExample)
	if err != nil {
		t.Fatal(err)
	}
	d := ds[0]
	if len(d.JWTSVIDs) != 1 || d.JWTBundleFileName != "bundle.json" || d.RenewSignal != "SIGUSR1" {
		t.Fatalf("Parse() = %+v", d)
	}
	want := []string{"your-audience", "your-extra-audience-1", "your-extra-audience-2"}
	if got := d.JWTSVIDs[0].Audiences(); !slices.Equal(got, want) {
		t.Fatalf("audiences = %q, want %q", got, want)
	}
	if d.JWTSVIDs[0].FileName != "jwt_svid.token" || !d.WantsJWT() {
		t.Fatalf("JWT-SVID = %+v", d.JWTSVIDs[0])
	}
	// A delivery without JWT fields asks for nothing of the kind.
	ds, err = Parse(Key, "- cert_dir: /a\n")
	if err != nil || ds[0].WantsJWT() {
		t.Fatalf("plain delivery wants JWT (%v)", err)
	}
	for _, sig := range RenewSignals {
		if _, err := Parse(Key, "- cert_dir: /a\n  renew_signal: "+sig+"\n"); err != nil {
			t.Errorf("renew_signal %s: %v", sig, err)
		}
	}
	// URLs and SPIFFE IDs are audiences; exactly the limits pass.
	aud := strings.Repeat("a", maxAudienceLen)
	extra := make([]string, MaxAudiences-1)
	for i := range extra {
		extra[i] = fmt.Sprintf("'https://svc%d.example.org:8443/p?q=1#f'", i)
	}
	v := fmt.Sprintf("- cert_dir: /a\n  jwt_svids:\n  - {jwt_audience: %s, jwt_extra_audiences: [%s], jwt_svid_file_name: t}\n", aud, strings.Join(extra, ", "))
	if _, err := Parse(Key, v); err != nil {
		t.Fatalf("%d audiences, one of %d bytes: %v", MaxAudiences, maxAudienceLen, err)
	}
	if _, err := Parse(Key, jwtItems(MaxJWTSVIDs)); err != nil {
		t.Fatalf("%d JWT-SVIDs: %v", MaxJWTSVIDs, err)
	}
}

// JWTRequests asks once per distinct audience list, in order.
func TestJWTRequests(t *testing.T) {
	ds, err := Parse(Key, `- cert_dir: /a
  jwt_svids:
  - {jwt_audience: x, jwt_svid_file_name: t1}
  - {jwt_audience: x, jwt_extra_audiences: [y], jwt_svid_file_name: t2}
- cert_dir: /b
  jwt_svids:
  - {jwt_audience: x, jwt_svid_file_name: t1}
  jwt_bundle_file_name: b.json
`)
	if err != nil {
		t.Fatal(err)
	}
	auds, bundles := JWTRequests(ds)
	if want := [][]string{{"x"}, {"x", "y"}}; !reflect.DeepEqual(auds, want) || !bundles {
		t.Fatalf("JWTRequests = %q, %v; want %q, true", auds, bundles, want)
	}
	if auds, bundles := JWTRequests(ds[1:2]); len(auds) != 1 || !bundles {
		t.Fatalf("JWTRequests(second) = %q, %v", auds, bundles)
	}
}

// jwtItems is one delivery asking for n JWT-SVIDs.
func jwtItems(n int) string {
	var b strings.Builder
	b.WriteString("- cert_dir: /a\n  jwt_svids:\n")
	for i := range n {
		fmt.Fprintf(&b, "  - {jwt_audience: a%d, jwt_svid_file_name: t%d}\n", i, i)
	}
	return b.String()
}

func jwtErrorCases() []errCase {
	one := func(fields string) string {
		return "- cert_dir: /a\n  jwt_svids:\n  - " + fields + "\n"
	}
	return []errCase{
		{"jwt_svids not a list", "- cert_dir: /a\n  jwt_svids: x\n", []string{"not a YAML list of deliveries"}},
		{"jwt_svids null item", "- cert_dir: /a\n  jwt_svids:\n  - ~\n", []string{"delivery 0", "jwt_svids item 0 is empty"}},
		{"jwt_svids unknown key", one("{jwt_audience: a, jwt_svid_file_name: t, jwt_svid_file_mode: 0644}"), []string{"jwt_svid_file_mode"}},
		{"jwt_audience missing", one("{jwt_svid_file_name: t}"), []string{"jwt_svids item 0", "jwt_audience is required"}},
		{"jwt_svid_file_name missing", one("{jwt_audience: a}"), []string{"jwt_svids item 0", "jwt_svid_file_name is required"}},
		{"jwt_svid_file_name traversal", one("{jwt_audience: a, jwt_svid_file_name: ../../etc/passwd}"), []string{"jwt_svid_file_name", "must not contain '/'"}},
		{"jwt_svid_file_name ..data", one("{jwt_audience: a, jwt_svid_file_name: ..data}"), []string{"jwt_svid_file_name", "reserved"}},
		{"jwt_svid_file_name binary", one("{jwt_audience: a, jwt_svid_file_name: !!binary dP8=}"), []string{"jwt_svid_file_name", "non-UTF-8"}},
		{"jwt_svid_file_name is the key", one("{jwt_audience: a, jwt_svid_file_name: svid_key.pem}"), []string{"jwt_svid_file_name \"svid_key.pem\" is already the name of another file"}},
		{"two tokens one file", "- cert_dir: /a\n  jwt_svids:\n  - {jwt_audience: a, jwt_svid_file_name: t}\n  - {jwt_audience: b, jwt_svid_file_name: t}\n", []string{"jwt_svids item 1", "already the name"}},
		{"jwt bundle file is the token", "- cert_dir: /a\n  jwt_bundle_file_name: t\n  jwt_svids:\n  - {jwt_audience: a, jwt_svid_file_name: t}\n", []string{"already the name"}},
		{"jwt bundle file is the bundle", "- cert_dir: /a\n  jwt_bundle_file_name: svid_bundle.pem\n", []string{"jwt_bundle_file_name", "already the name"}},
		{"jwt bundle file traversal", "- cert_dir: /a\n  jwt_bundle_file_name: /etc/passwd\n", []string{"jwt_bundle_file_name", "'/'"}},
		{"audience empty", one("{jwt_audience: '', jwt_svid_file_name: t}"), []string{"jwt_audience is required"}},
		{"audience with space", one("{jwt_audience: 'a b', jwt_svid_file_name: t}"), []string{"audience \"a b\" holds ' '"}},
		{"audience newline", one(`{jwt_audience: "a\nb", jwt_svid_file_name: t}`), []string{"audience", "holds '\\n'"}},
		{"audience quote", one(`{jwt_audience: 'a"b', jwt_svid_file_name: t}`), []string{"audience", "holds '\"'"}},
		{"audience right-to-left override", one("{jwt_audience: \"a\\u202eb\", jwt_svid_file_name: t}"), []string{"audience", "holds"}},
		{"audience non-ASCII", one("{jwt_audience: 'sérvice', jwt_svid_file_name: t}"), []string{"audience", "holds 'é'"}},
		{"audience binary", one("{jwt_audience: !!binary YQBi, jwt_svid_file_name: t}"), []string{"audience", "holds"}},
		{"audience too long", one("{jwt_audience: " + strings.Repeat("a", maxAudienceLen+1) + ", jwt_svid_file_name: t}"), []string{"longer than 256 bytes"}},
		{"audience not a string", one("{jwt_audience: [a, b], jwt_svid_file_name: t}"), []string{"not a YAML list of deliveries"}},
		{"too many audiences", one("{jwt_audience: a, jwt_extra_audiences: [b, c, d, e, f, g, h, i], jwt_svid_file_name: t}"), []string{"9 audiences, more than the 8 allowed"}},
		{"extra audience null", one("{jwt_audience: a, jwt_extra_audiences: [b, ~], jwt_svid_file_name: t}"), []string{"jwt_extra_audiences item 1 is empty"}},
		{"extra audience empty", one("{jwt_audience: a, jwt_extra_audiences: [''], jwt_svid_file_name: t}"), []string{"audience is empty"}},
		{"audience twice", one("{jwt_audience: a, jwt_extra_audiences: [a], jwt_svid_file_name: t}"), []string{"audience \"a\" is listed twice"}},
		{"too many JWT-SVIDs", jwtItems(MaxJWTSVIDs + 1), []string{"9 JWT-SVIDs, more than the 8 allowed"}},
		{"too many JWT-SVIDs across deliveries", jwtItems(5) + strings.Replace(jwtItems(4), "/a", "/b", 1), []string{"9 JWT-SVIDs, more than the 8 allowed"}},
		{"renew_signal SIGKILL", "- cert_dir: /a\n  renew_signal: SIGKILL\n", []string{"renew_signal \"SIGKILL\" is not allowed", "SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH"}},
		{"renew_signal SIGTERM", "- cert_dir: /a\n  renew_signal: SIGTERM\n", []string{"renew_signal \"SIGTERM\" is not allowed"}},
		{"renew_signal number", "- cert_dir: /a\n  renew_signal: 9\n", []string{"renew_signal \"9\" is not allowed"}},
		{"renew_signal lower case", "- cert_dir: /a\n  renew_signal: sighup\n", []string{"renew_signal \"sighup\" is not allowed"}},
		{"renew_signal without SIG", "- cert_dir: /a\n  renew_signal: HUP\n", []string{"renew_signal \"HUP\" is not allowed"}},
		{"renew_signal control", "- cert_dir: /a\n  renew_signal: \"SIGHUP\\n\"\n", []string{"renew_signal must be one of"}},
		{"renew_signal list", "- cert_dir: /a\n  renew_signal: [SIGHUP]\n", []string{"not a YAML list of deliveries"}},
	}
}

func TestParseJWTErrors(t *testing.T) {
	const key = Key + ".web"
	for _, tc := range jwtErrorCases() {
		t.Run(tc.name, func(t *testing.T) {
			ds, err := Parse(key, tc.value)
			if err == nil {
				t.Fatalf("Parse(%q) = %+v, want error", tc.value, ds)
			}
			msg := err.Error()
			if ds != nil || !strings.HasPrefix(msg, "annotation "+key+": ") || strings.Contains(msg, "\n") {
				t.Errorf("error %q: want one line naming %s and no deliveries (got %+v)", msg, key, ds)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not contain %q", msg, w)
				}
			}
		})
	}
}

// checkJWTInvariants holds for every delivery Parse accepts.
func checkJWTInvariants(t *testing.T, ds []Delivery) {
	t.Helper()
	n := 0
	for i, d := range ds {
		if d.Layout == LayoutSPIFFEFS {
			// The layout fixes its file set: no JWT files in it.
			if d.WantsJWT() {
				t.Fatalf("delivery %d: JWT fields accepted with layout %s", i, LayoutSPIFFEFS)
			}
			continue
		}
		names := []string{d.SVIDFileName, d.KeyFileName, d.BundleFileName}
		if d.CredentialBundleFileName != "" {
			names = append(names, d.CredentialBundleFileName)
		}
		if d.JWTBundleFileName != "" {
			names = append(names, d.JWTBundleFileName)
		}
		for _, j := range d.JWTSVIDs {
			n++
			if j == nil {
				t.Fatalf("delivery %d: null JWT-SVID accepted", i)
			}
			names = append(names, j.FileName)
			aud := j.Audiences()
			if len(aud) > MaxAudiences || len(aud) != 1+len(j.ExtraAudiences) {
				t.Fatalf("delivery %d: audiences %q accepted", i, aud)
			}
			for _, a := range aud {
				if checkAudience(a) != nil {
					t.Fatalf("delivery %d: audience %q accepted", i, a)
				}
			}
		}
		for k, name := range names {
			if name == "" || strings.Contains(name, "/") || strings.HasPrefix(name, "..") || slices.Contains(names[:k], name) {
				t.Fatalf("delivery %d: file names %q", i, names)
			}
		}
		if d.RenewSignal != "" && !slices.Contains(RenewSignals, d.RenewSignal) {
			t.Fatalf("delivery %d: renew_signal %q accepted", i, d.RenewSignal)
		}
	}
	if n > MaxJWTSVIDs {
		t.Fatalf("%d JWT-SVIDs accepted", n)
	}
}
