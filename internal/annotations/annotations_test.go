package annotations

import (
	"fmt"
	"path"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

const seedExample = `- spire_agent_address: /tmp/agent.sock
  cert_dir: /var/certs
  svid_file_name: svid.pem
  svid_key_file_name: svid_key.pem
  svid_bundle_file_name: svid_bundle.pem
`

func TestFind(t *testing.T) {
	named := Key + ".web"
	tests := []struct {
		name        string
		annotations map[string]string
		wantKey     string
		wantValue   string
		wantOK      bool
	}{
		{
			name:        "nil map",
			annotations: nil,
			wantKey:     Key,
		},
		{
			name:        "no identity annotation",
			annotations: map[string]string{CRIOContainerName: "web", "other": "x"},
			wantKey:     Key,
		},
		{
			name:        "unnamed key only",
			annotations: map[string]string{Key: "unnamed"},
			wantKey:     Key, wantValue: "unnamed", wantOK: true,
		},
		{
			name:        "CRI-O name selects named entry",
			annotations: map[string]string{CRIOContainerName: "web", named: "named", Key: "unnamed"},
			wantKey:     named, wantValue: "named", wantOK: true,
		},
		{
			name:        "containerd name selects named entry",
			annotations: map[string]string{ContainerdContainerName: "web", named: "named", Key: "unnamed"},
			wantKey:     named, wantValue: "named", wantOK: true,
		},
		{
			name:        "named container falls back to unnamed key",
			annotations: map[string]string{CRIOContainerName: "db", named: "named", Key: "unnamed"},
			wantKey:     Key, wantValue: "unnamed", wantOK: true,
		},
		{
			name:        "containerd named container falls back to unnamed key",
			annotations: map[string]string{ContainerdContainerName: "db", named: "named", Key: "unnamed"},
			wantKey:     Key, wantValue: "unnamed", wantOK: true,
		},
		{
			name:        "named entry for another container only",
			annotations: map[string]string{CRIOContainerName: "db", named: "named"},
			wantKey:     Key,
		},
		{
			name:        "containerd: named entry for another container only",
			annotations: map[string]string{ContainerdContainerName: "db", named: "named"},
			wantKey:     Key,
		},
		{
			name:        "no container name: named entry is not used",
			annotations: map[string]string{named: "named"},
			wantKey:     Key,
		},
		{
			name:        "empty container name does not select Key+\".\"",
			annotations: map[string]string{CRIOContainerName: "", Key + ".": "dot", Key: "unnamed"},
			wantKey:     Key, wantValue: "unnamed", wantOK: true,
		},
		{
			name:        "empty named value is still found",
			annotations: map[string]string{CRIOContainerName: "web", named: "", Key: "unnamed"},
			wantKey:     named, wantValue: "", wantOK: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, v, ok := Find(tt.annotations)
			if k != tt.wantKey || v != tt.wantValue || ok != tt.wantOK {
				t.Fatalf("Find() = (%q, %q, %v), want (%q, %q, %v)", k, v, ok, tt.wantKey, tt.wantValue, tt.wantOK)
			}
		})
	}
}

func TestParseDefaults(t *testing.T) {
	ds, err := Parse(Key, "- cert_dir: /run/identity\n")
	if err != nil {
		t.Fatal(err)
	}
	want := []Delivery{{
		CertDir:        "/run/identity",
		SVIDFileName:   DefaultSVIDFileName,
		KeyFileName:    DefaultKeyFileName,
		BundleFileName: DefaultBundleFileName,
	}}
	if !reflect.DeepEqual(ds, want) {
		t.Fatalf("Parse() = %+v, want %+v", ds, want)
	}
	if d := ds[0]; d.SVIDFileName != "svid.pem" || d.KeyFileName != "svid_key.pem" || d.BundleFileName != "svid_bundle.pem" {
		t.Fatalf("file names = %q %q %q", d.SVIDFileName, d.KeyFileName, d.BundleFileName)
	}
}

// TestParseNextToKernelFilesystems: only /dev, /proc and /sys and what lies
// under them are refused, not names that merely start the same, and a file
// name of the full 255 bytes is taken (the writer can write it).
func TestParseNextToKernelFilesystems(t *testing.T) {
	for _, dir := range []string{"/devices", "/proc-certs", "/system", "/run/dev", "/var/sys", "/srv/proc"} {
		if _, err := Parse(Key, "- cert_dir: "+dir+"\n"); err != nil {
			t.Errorf("cert_dir %s: %v", dir, err)
		}
	}
	name := strings.Repeat("n", 255)
	if _, err := Parse(Key, "- cert_dir: /certs\n  svid_file_name: "+name+"\n"); err != nil {
		t.Errorf("a 255-byte file name: %v", err)
	}
}

func TestParseSeedExample(t *testing.T) {
	ds, err := Parse(Key, seedExample)
	if err != nil {
		t.Fatal(err)
	}
	want := []Delivery{{
		CertDir:        "/var/certs",
		SVIDFileName:   "svid.pem",
		KeyFileName:    "svid_key.pem",
		BundleFileName: "svid_bundle.pem",
		AgentAddress:   "/tmp/agent.sock",
	}}
	if !reflect.DeepEqual(ds, want) {
		t.Fatalf("Parse() = %+v, want %+v", ds, want)
	}
}

func TestParseFull(t *testing.T) {
	value := `- cert_dir: /a
  svid_file_name: cert.pem
  svid_key_file_name: key.pem
  svid_bundle_file_name: ca.pem
  spiffe_id: spiffe://example.org/web
  credential_bundle_file_name: credential-bundle.pem
- cert_dir: /b/c
  spire_agent_address: /run/spire/other.sock
  include_federated_domains: true
`
	ds, err := Parse(Key, value)
	if err != nil {
		t.Fatal(err)
	}
	want := []Delivery{
		{CertDir: "/a", SVIDFileName: "cert.pem", KeyFileName: "key.pem", BundleFileName: "ca.pem", SPIFFEID: "spiffe://example.org/web", CredentialBundleFileName: "credential-bundle.pem"},
		{CertDir: "/b/c", SVIDFileName: DefaultSVIDFileName, KeyFileName: DefaultKeyFileName, BundleFileName: DefaultBundleFileName, AgentAddress: "/run/spire/other.sock", IncludeFederatedDomains: true},
	}
	if !reflect.DeepEqual(ds, want) {
		t.Fatalf("Parse() = %+v, want %+v", ds, want)
	}
	// Sibling directories sharing a prefix are not nested.
	if _, err := Parse(Key, "- cert_dir: /a\n- cert_dir: /ab\n"); err != nil {
		t.Fatalf("sibling /a and /ab: %v", err)
	}
	// Flow style is YAML as well.
	if _, err := Parse(Key, `[{cert_dir: /x}]`); err != nil {
		t.Fatalf("flow style: %v", err)
	}
	// Exactly MaxDeliveries is allowed.
	if ds, err := Parse(Key, deliveries(MaxDeliveries)); err != nil || len(ds) != MaxDeliveries {
		t.Fatalf("%d deliveries: %d, %v", MaxDeliveries, len(ds), err)
	}
}

func TestParseLayout(t *testing.T) {
	ds, err := Parse(Key, "- cert_dir: /run/secrets/spiffe\n  layout: spiffe-fs\n  spiffe_id: spiffe://example.org/web\n- cert_dir: /certs\n")
	if err != nil {
		t.Fatal(err)
	}
	want := []Delivery{
		{CertDir: "/run/secrets/spiffe", Layout: LayoutSPIFFEFS, SPIFFEID: "spiffe://example.org/web"},
		{CertDir: "/certs", SVIDFileName: DefaultSVIDFileName, KeyFileName: DefaultKeyFileName, BundleFileName: DefaultBundleFileName},
	}
	if !reflect.DeepEqual(ds, want) {
		t.Fatalf("Parse() = %+v, want %+v", ds, want)
	}
}

func deliveries(n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "- cert_dir: /d%d\n", i)
	}
	return b.String()
}

// billionLaughs is the YAML alias bomb: a few hundred bytes that expand to
// billions of nodes if aliases are followed naively.
const billionLaughs = `a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
`

// billionLaughsList is the same bomb shaped as a list of deliveries, so
// that it reaches the decoding into []Delivery.
const billionLaughsList = `- &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]
- &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
- &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
- &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
- &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
- &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
- &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
- &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
- &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
`

type errCase struct {
	name  string
	value string
	// want are substrings the error must hold (besides the annotation key).
	want []string
}

func parseErrorCases() []errCase {
	return []errCase{
		{"malformed YAML", "- cert_dir: [/a\n", []string{"not a YAML list of deliveries"}},
		{"malformed YAML tab", "- cert_dir: /a\n\t- x", []string{"not a YAML list of deliveries"}},
		{"mapping, not a list", "cert_dir: /a\n", []string{"not a YAML list of deliveries"}},
		{"scalar, not a list", "/var/certs", []string{"not a YAML list of deliveries"}},
		{"list of scalars", "- /var/certs\n", []string{"not a YAML list of deliveries"}},
		{"empty value", "", []string{"value is empty", "cert_dir"}},
		{"whitespace value", "  \n\n", []string{"value is empty"}},
		{"comment only", "# nothing\n", []string{"value is empty"}},
		{"empty list", "[]", []string{"lists no delivery"}},
		{"null", "~", []string{"lists no delivery"}},
		{"missing cert_dir", "- svid_file_name: a.pem\n", []string{"delivery 0", "cert_dir is required"}},
		// yaml.v3 drops null list items, so a list of only nulls lists nothing.
		{"null delivery", "- \n", []string{"delivery 0 is empty"}},
		{"empty delivery", "- {}\n", []string{"delivery 0", "cert_dir is required"}},
		{"empty cert_dir", "- cert_dir: ''\n", []string{"cert_dir is required"}},
		{"relative cert_dir", "- cert_dir: var/certs\n", []string{"cert_dir \"var/certs\"", "absolute"}},
		{"dot cert_dir", "- cert_dir: .\n", []string{"cert_dir", "absolute"}},
		{"cert_dir with ..", "- cert_dir: /var/../etc\n", []string{"cert_dir \"/var/../etc\"", "'..'"}},
		{"cert_dir ending in ..", "- cert_dir: /var/..\n", []string{"cert_dir", "'..'"}},
		{"cert_dir double slash", "- cert_dir: /a//b\n", []string{"cert_dir \"/a//b\"", "clean"}},
		{"cert_dir dot element", "- cert_dir: /a/./b\n", []string{"cert_dir \"/a/./b\"", "clean"}},
		{"cert_dir trailing slash", "- cert_dir: /a/\n", []string{"cert_dir \"/a/\"", "clean"}},
		{"cert_dir root", "- cert_dir: /\n", []string{"cert_dir", "root"}},
		{"cert_dir double root", "- cert_dir: //\n", []string{"cert_dir", "clean"}},
		// Kernel filesystems: an identity stacked there hides what the
		// runtime mounted (runc then fails on /dev/null or /proc/self/fd)
		// or, for /sys and /dev/shm, silently.
		{"cert_dir /dev", "- cert_dir: /dev\n", []string{"cert_dir \"/dev\"", "kernel filesystem"}},
		{"cert_dir /dev/shm", "- cert_dir: /dev/shm\n", []string{"cert_dir \"/dev/shm\"", "kernel filesystem"}},
		{"cert_dir /proc", "- cert_dir: /proc\n", []string{"cert_dir \"/proc\"", "kernel filesystem"}},
		{"cert_dir /proc/sys", "- cert_dir: /proc/sys\n", []string{"cert_dir \"/proc/sys\"", "kernel filesystem"}},
		{"cert_dir /sys", "- cert_dir: /sys\n", []string{"cert_dir \"/sys\"", "kernel filesystem"}},
		{"cert_dir /sys/fs/cgroup", "- cert_dir: /sys/fs/cgroup\n", []string{"cert_dir \"/sys/fs/cgroup\"", "kernel filesystem"}},
		{"cert_dir under /proc", "- cert_dir: /proc/1/root/certs\n", []string{"cert_dir \"/proc/1/root/certs\"", "kernel filesystem"}},
		{"cert_dir too long", "- cert_dir: /" + strings.Repeat("a", 1024) + "\n", []string{"cert_dir is longer than 1024"}},
		{"cert_dir newline", "- cert_dir: \"/a\\nb\"\n", []string{"cert_dir", "control, format or non-UTF-8 characters"}},
		{"cert_dir escape", "- cert_dir: \"/a\\x1bb\"\n", []string{"cert_dir", "control, format or non-UTF-8 characters"}},
		{"cert_dir DEL", "- cert_dir: \"/a\\x7fb\"\n", []string{"cert_dir", "control, format or non-UTF-8 characters"}},
		{"cert_dir C1 control", "- cert_dir: \"/a\\u0085b\"\n", []string{"cert_dir", "control, format or non-UTF-8 characters"}},
		{"svid file name with slash", "- cert_dir: /a\n  svid_file_name: x/svid.pem\n", []string{"svid_file_name", "must not contain '/'"}},
		{"key file name with slash", "- cert_dir: /a\n  svid_key_file_name: ../key.pem\n", []string{"svid_key_file_name", "'/'"}},
		{"bundle file name absolute", "- cert_dir: /a\n  svid_bundle_file_name: /etc/passwd\n", []string{"svid_bundle_file_name", "'/'"}},
		{"file name ..data", "- cert_dir: /a\n  svid_file_name: ..data\n", []string{"svid_file_name", "\"..data\"", "reserved"}},
		{"file name .", "- cert_dir: /a\n  svid_key_file_name: .\n", []string{"svid_key_file_name", "reserved"}},
		{"file name ..", "- cert_dir: /a\n  svid_bundle_file_name: ..\n", []string{"svid_bundle_file_name", "reserved"}},
		{"file name starting with ..", "- cert_dir: /a\n  svid_file_name: ..2026_01_01\n", []string{"svid_file_name", "reserved"}},
		{"file name ..tmp", "- cert_dir: /a\n  svid_file_name: ..tmp.svid.pem\n", []string{"svid_file_name", "reserved"}},
		{"file name too long", "- cert_dir: /a\n  svid_file_name: " + strings.Repeat("n", 256) + "\n", []string{"svid_file_name", "longer than 255"}},
		{"file name control char", "- cert_dir: /a\n  svid_file_name: \"a\\tb\"\n", []string{"svid_file_name", "control, format or non-UTF-8 characters"}},
		{"duplicate file names", "- cert_dir: /a\n  svid_file_name: x.pem\n  svid_key_file_name: x.pem\n", []string{"delivery 0", "must differ"}},
		{"file name equals default of another", "- cert_dir: /a\n  svid_bundle_file_name: svid.pem\n", []string{"must differ"}},
		{"duplicate cert_dir", "- cert_dir: /a\n- cert_dir: /a\n", []string{"delivery 1", "cert_dir \"/a\" is used twice"}},
		{"nested cert_dir", "- cert_dir: /a\n- cert_dir: /a/b\n", []string{"delivery 1", "\"/a/b\" lies inside cert_dir \"/a\""}},
		{"nested cert_dir reversed", "- cert_dir: /a/b/c\n- cert_dir: /a\n", []string{"delivery 0", "\"/a/b/c\" lies inside cert_dir \"/a\""}},
		{"unknown key cert-dir", "- cert-dir: /a\n", []string{"not a YAML list of deliveries", "cert-dir"}},
		{"unknown key next to cert_dir", "- cert_dir: /a\n  svid_key: k.pem\n", []string{"svid_key"}},
		{"invalid spiffe_id", "- cert_dir: /a\n  spiffe_id: example.org/web\n", []string{"spiffe_id \"example.org/web\"", "not a SPIFFE ID"}},
		{"spiffe_id wrong scheme", "- cert_dir: /a\n  spiffe_id: https://example.org/web\n", []string{"spiffe_id", "not a SPIFFE ID"}},
		{"spiffe_id upper case domain", "- cert_dir: /a\n  spiffe_id: spiffe://Example.org/web\n", []string{"spiffe_id", "not a SPIFFE ID"}},
		{"relative spire_agent_address", "- cert_dir: /a\n  spire_agent_address: agent.sock\n", []string{"spire_agent_address \"agent.sock\"", "absolute"}},
		{"value over 64 KiB", "- cert_dir: /a\n#" + strings.Repeat("x", MaxValueSize), []string{"bytes, more than the 65536 allowed"}},
		{"too many deliveries", deliveries(MaxDeliveries + 1), []string{"17 deliveries, more than the 16 allowed"}},
		{"alias bomb", billionLaughs, []string{"not a YAML list of deliveries"}},
		{"alias bomb list", billionLaughsList, []string{"not a YAML list of deliveries"}},
		{"invalid UTF-8", "- cert_dir: /a\xff\xfe\n", []string{"not valid UTF-8"}},
		{"NUL byte", "- cert_dir: /a\x00b\n", []string{"not valid UTF-8"}},
		{"binary", "\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", []string{"not valid UTF-8"}},
		{"second delivery at fault", "- cert_dir: /ok\n- cert_dir: rel\n", []string{"delivery 1", "cert_dir \"rel\""}},
		// YAML can decode to bytes the raw-value check never saw.
		{"binary file name", "- cert_dir: /certs\n  svid_file_name: !!binary Y2VydP8ucGVt\n", []string{"svid_file_name", "non-UTF-8"}},
		{"binary cert_dir", "- cert_dir: !!binary L2NlcnRz/w==\n", []string{"cert_dir", "non-UTF-8"}},
		{"right-to-left override", "- cert_dir: \"/certs\u202e\"\n", []string{"cert_dir", "format"}},
		{"second YAML document", "- cert_dir: /a\n---\n- cert_dir: ../x\n", []string{"more than one YAML document"}},
		{"broken second document", "- cert_dir: /a\n--- [\n", []string{"more than one YAML document"}},
		{"null item", "- cert_dir: /a\n- ~\n- cert_dir: /b\n", []string{"delivery 1 is empty"}},
		// credential_bundle_file_name: a plain name like the others.
		{"credential bundle traversal", "- cert_dir: /a\n  credential_bundle_file_name: ../../etc/shadow\n", []string{"credential_bundle_file_name", "must not contain '/'"}},
		{"credential bundle absolute", "- cert_dir: /a\n  credential_bundle_file_name: /etc/shadow\n", []string{"credential_bundle_file_name", "'/'"}},
		{"credential bundle ..data", "- cert_dir: /a\n  credential_bundle_file_name: ..data\n", []string{"credential_bundle_file_name", "reserved"}},
		{"credential bundle dot", "- cert_dir: /a\n  credential_bundle_file_name: .\n", []string{"credential_bundle_file_name", "reserved"}},
		{"credential bundle same as key", "- cert_dir: /a\n  credential_bundle_file_name: svid_key.pem\n", []string{"credential_bundle_file_name \"svid_key.pem\" must differ"}},
		{"credential bundle same as renamed cert", "- cert_dir: /a\n  svid_file_name: c.pem\n  credential_bundle_file_name: c.pem\n", []string{"credential_bundle_file_name \"c.pem\" must differ"}},
		{"credential bundle too long", "- cert_dir: /a\n  credential_bundle_file_name: " + strings.Repeat("n", 256) + "\n", []string{"credential_bundle_file_name", "longer than 255"}},
		{"credential bundle control char", "- cert_dir: /a\n  credential_bundle_file_name: \"a\\u202eb\"\n", []string{"credential_bundle_file_name", "control, format"}},
		{"credential bundle binary", "- cert_dir: /a\n  credential_bundle_file_name: !!binary Y2VydP8ucGVt\n", []string{"credential_bundle_file_name", "non-UTF-8"}},
		{"credential bundle list", "- cert_dir: /a\n  credential_bundle_file_name: [a, b]\n", []string{"not a YAML list of deliveries"}},
		// include_federated_domains: a YAML boolean and nothing else.
		{"include_federated_domains int", "- cert_dir: /a\n  include_federated_domains: 1\n", []string{"not a YAML list of deliveries", "into bool"}},
		{"include_federated_domains string", "- cert_dir: /a\n  include_federated_domains: \"true\"\n", []string{"into bool"}},
		{"include_federated_domains list", "- cert_dir: /a\n  include_federated_domains: [true]\n", []string{"into bool"}},
		{"include_federated_domains mapping", "- cert_dir: /a\n  include_federated_domains: {a: true}\n", []string{"into bool"}},
		{"include_federated_domains path", "- cert_dir: /a\n  include_federated_domains: /etc/ssl/certs\n", []string{"into bool"}},
		// yaml.v3 takes YAML 1.1's on/off/yes/no into a plain bool; not here.
		{"include_federated_domains on", "- cert_dir: /a\n  include_federated_domains: on\n", []string{"cannot unmarshal !!str `on` into bool"}},
		{"include_federated_domains quoted on", "- cert_dir: /a\n  include_federated_domains: \"on\"\n", []string{"`on` into bool"}},
		{"include_federated_domains yes", "- cert_dir: /a\n  include_federated_domains: yes\n", []string{"`yes` into bool"}},
		{"include_federated_domains off", "- cert_dir: /a\n  include_federated_domains: off\n", []string{"`off` into bool"}},
		{"include_federated_domains n", "- cert_dir: /a\n  include_federated_domains: n\n", []string{"`n` into bool"}},
		{"include_federated_domains misspelt", "- cert_dir: /a\n  include_federated_domain: true\n", []string{"include_federated_domain not found"}},
		// The per-trust-domain files' names are not for the taking.
		{"bundle named like a trust domain's", "- cert_dir: /a\n  svid_bundle_file_name: evil.test.trust-bundle.pem\n", []string{"svid_bundle_file_name", "reserved", ".trust-bundle.pem"}},
		{"cert named like a trust domain's", "- cert_dir: /a\n  svid_file_name: example.org.trust-bundle.pem\n", []string{"svid_file_name", "reserved"}},
		{"credential bundle named like a trust domain's", "- cert_dir: /a\n  credential_bundle_file_name: .trust-bundle.pem\n", []string{"credential_bundle_file_name", "reserved"}},
		// layout: spiffe-fs or nothing, and spiffe-fs fixes every name.
		{"unknown layout", "- cert_dir: /a\n  layout: spiffe\n", []string{"layout \"spiffe\" is not known", "spiffe-fs"}},
		{"layout path", "- cert_dir: /a\n  layout: ../../etc\n", []string{"layout", "is not known"}},
		{"layout binary", "- cert_dir: /a\n  layout: !!binary c3BpZmZlLWZz/w==\n", []string{"layout \"(unprintable or too long)\" is not known"}},
		{"layout list", "- cert_dir: /a\n  layout: [spiffe-fs]\n", []string{"not a YAML list of deliveries"}},
		{"layout upper case", "- cert_dir: /a\n  layout: SPIFFE-FS\n", []string{"is not known"}},
		{"spiffe-fs with svid_file_name", "- cert_dir: /a\n  layout: spiffe-fs\n  svid_file_name: cert.pem\n", []string{"svid_file_name cannot be used with layout spiffe-fs"}},
		{"spiffe-fs with key name", "- cert_dir: /a\n  layout: spiffe-fs\n  svid_key_file_name: k.pem\n", []string{"svid_key_file_name cannot be used"}},
		{"spiffe-fs with bundle name", "- cert_dir: /a\n  layout: spiffe-fs\n  svid_bundle_file_name: b.pem\n", []string{"svid_bundle_file_name cannot be used"}},
		{"spiffe-fs with credential bundle name", "- cert_dir: /a\n  layout: spiffe-fs\n  credential_bundle_file_name: c.pem\n", []string{"credential_bundle_file_name cannot be used"}},
		{"spiffe-fs merged", "- cert_dir: /a\n  layout: spiffe-fs\n  include_federated_domains: true\n", []string{"include_federated_domains cannot be used"}},
		{"spiffe-fs with jwt_svids", "- cert_dir: /a\n  layout: spiffe-fs\n  jwt_svids: [{jwt_audience: x, jwt_svid_file_name: t}]\n", []string{"jwt_svids cannot be used with layout spiffe-fs"}},
		{"spiffe-fs with jwt bundle", "- cert_dir: /a\n  layout: spiffe-fs\n  jwt_bundle_file_name: j.json\n", []string{"jwt_bundle_file_name cannot be used"}},
		{"jwt token named as the credential bundle", "- cert_dir: /a\n  credential_bundle_file_name: c.pem\n  jwt_svids: [{jwt_audience: x, jwt_svid_file_name: c.pem}]\n", []string{"jwt_svid_file_name \"c.pem\" is already the name of another file"}},
		{"jwt token named as a trust bundle", "- cert_dir: /a\n  jwt_svids: [{jwt_audience: x, jwt_svid_file_name: example.org.trust-bundle.pem}]\n", []string{"reserved"}},
		{"spiffe-fs bad spiffe_id", "- cert_dir: /a\n  layout: spiffe-fs\n  spiffe_id: example.org/x\n", []string{"not a SPIFFE ID"}},
		{"spiffe-fs relative agent", "- cert_dir: /a\n  layout: spiffe-fs\n  spire_agent_address: a.sock\n", []string{"absolute socket path"}},
		{"spiffe-fs bad cert_dir", "- cert_dir: a\n  layout: spiffe-fs\n", []string{"absolute"}},
		{"credential bundle mapping", "- cert_dir: /a\n  credential_bundle_file_name: {a: b}\n", []string{"not a YAML list of deliveries"}},
	}
}

func TestParseErrors(t *testing.T) {
	const key = Key + ".web"
	for _, tc := range parseErrorCases() {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			ds, err := Parse(key, tc.value)
			if elapsed := time.Since(start); elapsed > 2*time.Second {
				t.Errorf("Parse took %s", elapsed)
			}
			if err == nil {
				t.Fatalf("Parse(%q) = %+v, want error", tc.value, ds)
			}
			if ds != nil {
				t.Errorf("Parse returned deliveries %+v with error", ds)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "annotation "+key+": ") {
				t.Errorf("error %q does not name the annotation %s", msg, key)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not contain %q", msg, w)
				}
			}
			if strings.Contains(msg, "\n") {
				t.Errorf("error %q spans lines", msg)
			}
		})
	}
}

// The alias bomb must be refused quickly, not after expanding it.
func TestParseAliasBombFast(t *testing.T) {
	for _, v := range []string{billionLaughs, billionLaughsList} {
		done := make(chan error, 1)
		go func() {
			_, err := Parse(Key, v)
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil {
				t.Fatal("alias bomb accepted")
			}
		case <-time.After(5 * time.Second):
			t.Fatal("alias bomb not refused within 5s")
		}
	}
}

// A value of exactly MaxValueSize bytes is not refused for its size.
func TestParseMaxSize(t *testing.T) {
	v := "- cert_dir: /a\n#"
	v += strings.Repeat("x", MaxValueSize-len(v))
	if len(v) != MaxValueSize {
		t.Fatalf("len = %d", len(v))
	}
	if _, err := Parse(Key, v); err != nil {
		t.Fatalf("value of %d bytes: %v", len(v), err)
	}
}

func checkInvariants(t *testing.T, ds []Delivery) {
	t.Helper()
	if len(ds) == 0 || len(ds) > MaxDeliveries {
		t.Fatalf("accepted %d deliveries", len(ds))
	}
	dirs := map[string]bool{}
	for i, d := range ds {
		if !path.IsAbs(d.CertDir) || path.Clean(d.CertDir) != d.CertDir || d.CertDir == "/" {
			t.Fatalf("delivery %d: cert_dir %q is not absolute and clean", i, d.CertDir)
		}
		for _, part := range strings.Split(d.CertDir, "/") {
			if part == ".." {
				t.Fatalf("delivery %d: cert_dir %q holds '..'", i, d.CertDir)
			}
		}
		if dirs[d.CertDir] {
			t.Fatalf("delivery %d: cert_dir %q twice", i, d.CertDir)
		}
		dirs[d.CertDir] = true
		if d.Layout != "" {
			if d.Layout != LayoutSPIFFEFS || d.SVIDFileName != "" || d.KeyFileName != "" || d.BundleFileName != "" || d.CredentialBundleFileName != "" || d.IncludeFederatedDomains {
				t.Fatalf("delivery %d: layout %q with names or a merged bundle: %+v", i, d.Layout, d)
			}
			continue
		}
		names := []string{d.SVIDFileName, d.KeyFileName, d.BundleFileName}
		for _, n := range append(names, d.CredentialBundleFileName) {
			if strings.HasSuffix(n, TrustBundleSuffix) {
				t.Fatalf("delivery %d: file name %q stands in for a trust domain's bundle", i, n)
			}
		}
		for _, n := range names {
			if n == "" || n == "." || strings.Contains(n, "/") || strings.HasPrefix(n, "..") {
				t.Fatalf("delivery %d: bad file name %q", i, n)
			}
		}
		if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
			t.Fatalf("delivery %d: file names %q are not pairwise different", i, names)
		}
		if n := d.CredentialBundleFileName; n != "" {
			if n == "." || strings.Contains(n, "/") || strings.HasPrefix(n, "..") || slices.Contains(names, n) {
				t.Fatalf("delivery %d: bad credential bundle name %q (others %q)", i, n, names)
			}
		}
		if d.AgentAddress != "" && !path.IsAbs(d.AgentAddress) {
			t.Fatalf("delivery %d: relative agent address %q", i, d.AgentAddress)
		}
	}
	for a := range dirs {
		for b := range dirs {
			if a != b && strings.HasPrefix(b, a+"/") {
				t.Fatalf("cert_dir %q lies inside %q", b, a)
			}
		}
	}
	checkJWTInvariants(t, ds)
}

func FuzzParse(f *testing.F) {
	f.Add(seedExample)
	f.Add("- cert_dir: /run/identity\n")
	f.Add("- cert_dir: /a\n  spiffe_id: spiffe://example.org/x\n- cert_dir: /b\n")
	for _, tc := range parseErrorCases() {
		f.Add(tc.value)
	}
	f.Fuzz(func(t *testing.T, value string) {
		start := time.Now()
		ds, err := Parse(Key, value)
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("Parse of %d bytes took %s", len(value), d)
		}
		if err != nil {
			if ds != nil {
				t.Fatalf("deliveries %+v returned with error %v", ds, err)
			}
			return
		}
		checkInvariants(t, ds)
	})
}
