// Package annotations parses the opt-in annotations by which a container
// asks for an identity.
//
// Annotations are written by whoever writes the pod. They choose where the
// files appear inside the container and what they are called; they never
// choose the identity (the agent attests the pid), never a host path, and
// name an agent socket only from the node's allowed list (checked by the
// caller against the node configuration).
package annotations

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"gopkg.in/yaml.v3"
)

// Key is the annotation for every container without a named entry
// (Podman, or all containers of a pod).
const Key = "identity.noderesource.dev/container"

// Container-name annotations set by CRI runtimes.
const (
	CRIOContainerName       = "io.kubernetes.container.name"
	ContainerdContainerName = "io.kubernetes.cri.container-name"
)

// ContainerdContainerType is set by containerd's CRI plugin on every
// container it creates: ContainerdTypeContainer for a pod's application
// and init containers, "sandbox" for the pause container.
const (
	ContainerdContainerType = "io.kubernetes.cri.container-type"
	ContainerdTypeContainer = "container"
)

// Defaults of the file names.
const (
	DefaultSVIDFileName   = "svid.pem"
	DefaultKeyFileName    = "svid_key.pem"
	DefaultBundleFileName = "svid_bundle.pem"
)

// TrustBundleSuffix names the per-trust-domain bundle files every delivery
// gets: <trust-domain>.trust-bundle.pem, its own trust domain and each one
// it federates with. File names from an annotation may not end with it.
const TrustBundleSuffix = ".trust-bundle.pem"

// The spiffe-fs layout: exactly the file set of the draft SPIFFE
// Filesystem Delivery standard (spiffe/spiffe pull request 376, as of its
// text of 2026): one credential bundle and one trust bundle per trust
// domain, nothing else.
const (
	LayoutSPIFFEFS            = "spiffe-fs"
	SPIFFEFSCredentialBundle  = "credential-bundle.private-key.x509.pem"
	SPIFFEFSTrustBundleSuffix = ".spiffe-trust-bundle.x509.pem"
)

// Limits that keep a hostile annotation from costing the hook much.
const (
	MaxValueSize  = 64 << 10
	MaxDeliveries = 16
	maxPathLen    = 1024
	maxNameLen    = 255
)

// Delivery says where one copy of the identity files appears in the container.
type Delivery struct {
	// CertDir is an absolute, clean path inside the container.
	CertDir string `yaml:"cert_dir" json:"cert_dir"`
	// File names inside CertDir.
	SVIDFileName   string `yaml:"svid_file_name" json:"svid_file_name"`
	KeyFileName    string `yaml:"svid_key_file_name" json:"svid_key_file_name"`
	BundleFileName string `yaml:"svid_bundle_file_name" json:"svid_bundle_file_name"`
	// CredentialBundleFileName, when set, also writes one file holding the
	// PKCS#8 key followed by the certificate chain, leaf first: the format
	// of Kubernetes Pod Certificates (credentialBundlePath) and of the
	// draft SPIFFE Filesystem Delivery standard. One read() of it always
	// gives a key and a certificate that belong together.
	CredentialBundleFileName string `yaml:"credential_bundle_file_name,omitempty" json:"credential_bundle_file_name,omitempty"`
	// IncludeFederatedDomains puts the federated trust domains' bundles in
	// the svid_bundle_file_name file too (spiffe-helper's name and
	// meaning), for applications that take one CA file. By default that
	// file holds the SVID's own trust domain only. Only a YAML boolean
	// is taken (Bool).
	IncludeFederatedDomains Bool `yaml:"include_federated_domains,omitempty" json:"include_federated_domains,omitempty"`
	// Layout "spiffe-fs" writes exactly the draft SPIFFE Filesystem
	// Delivery standard's files instead of the names above, which must
	// then be left out.
	Layout string `yaml:"layout,omitempty" json:"layout,omitempty"`
	// SPIFFEID, when set, picks one of the SVIDs the agent returned for the
	// container; it can never obtain one the agent did not return.
	SPIFFEID string `yaml:"spiffe_id,omitempty" json:"spiffe_id,omitempty"`
	// AgentAddress names an agent admin socket; the caller accepts it only if
	// the node configuration allows it.
	AgentAddress string `yaml:"spire_agent_address,omitempty" json:"spire_agent_address,omitempty"`

	// JWTSVIDs asks for JWT-SVIDs of the delivered identity, one file each
	// (spiffe-helper's jwt_svids). Pointers, so that a null item is seen.
	JWTSVIDs []*JWTSVID `yaml:"jwt_svids,omitempty" json:"jwt_svids,omitempty"`
	// JWTBundleFileName, when set, names the file of the JWT bundles (JSON,
	// keyed by trust domain, as spiffe-helper writes it).
	JWTBundleFileName string `yaml:"jwt_bundle_file_name,omitempty" json:"jwt_bundle_file_name,omitempty"`
	// RenewSignal, when set, is sent to the container's init process after
	// the refresher rewrites this delivery's files (spiffe-helper's
	// renew_signal); only the signals in RenewSignals.
	RenewSignal string `yaml:"renew_signal,omitempty" json:"renew_signal,omitempty"`
}

// Find returns the annotation that applies to a container, if any. A
// container named NAME (by CRI-O's or containerd's name annotation) uses
// Key+"."+NAME when present, and Key otherwise.
func Find(annotations map[string]string) (key, value string, ok bool) {
	for _, nameKey := range []string{CRIOContainerName, ContainerdContainerName} {
		if name := annotations[nameKey]; name != "" {
			if v, ok := annotations[Key+"."+name]; ok {
				return Key + "." + name, v, true
			}
		}
	}
	v, ok := annotations[Key]
	return Key, v, ok
}

// IsIdentityKey reports whether key is an identity annotation, for any
// container: Key or Key+"."+name.
func IsIdentityKey(key string) bool {
	return key == Key || strings.HasPrefix(key, Key+".")
}

// Misquoted returns the key of an annotation that is an identity
// annotation but for a double quote before it: what Podman 5 makes of
// --annotation '"KEY=VALUE"', the form Podman 4 needed for a value holding
// commas. Podman 5 takes each --annotation verbatim (a pflag StringArray,
// no longer a CSV StringSlice), so the quotes stay in the key and the
// value. Such a container asked for an identity and must not start
// without one.
func Misquoted(ann map[string]string) (string, bool) {
	for k := range ann {
		if rest, ok := strings.CutPrefix(k, `"`); ok && IsIdentityKey(rest) {
			return k, true
		}
	}
	return "", false
}

// Parse parses and validates an annotation's value: a YAML list of
// deliveries. Errors name the annotation and the field at fault.
func Parse(key, value string) ([]Delivery, error) {
	ds, err := parse(value)
	if err != nil {
		return nil, fmt.Errorf("annotation %s: %w", key, err)
	}
	return ds, nil
}

func parse(value string) ([]Delivery, error) {
	if len(value) > MaxValueSize {
		return nil, fmt.Errorf("value is %d bytes, more than the %d allowed", len(value), MaxValueSize)
	}
	if !utf8.ValidString(value) || strings.ContainsRune(value, 0) {
		return nil, errors.New("value is not valid UTF-8 text")
	}
	// Pointers, so that a null item is seen (yaml.v3 drops it from a list
	// of structs, which would renumber the deliveries after it).
	var items []*Delivery
	dec := yaml.NewDecoder(bytes.NewReader([]byte(value)))
	// Unknown keys are refused: a misspelt cert_dir must not silently
	// deliver somewhere else.
	dec.KnownFields(true)
	if err := dec.Decode(&items); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("value is empty: expected a YAML list of deliveries, each with cert_dir")
		}
		return nil, fmt.Errorf("value is not a YAML list of deliveries: %s", oneLine(err.Error()))
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("value holds more than one YAML document")
	}
	ds := make([]Delivery, len(items))
	for i, d := range items {
		if d == nil {
			return nil, fmt.Errorf("delivery %d is empty", i)
		}
		ds[i] = *d
	}
	if len(ds) == 0 {
		return nil, errors.New("value lists no delivery: expected a YAML list of deliveries, each with cert_dir")
	}
	if len(ds) > MaxDeliveries {
		return nil, fmt.Errorf("value lists %d deliveries, more than the %d allowed", len(ds), MaxDeliveries)
	}
	jwts := 0
	for i := range ds {
		jwts += len(ds[i].JWTSVIDs)
	}
	if jwts > MaxJWTSVIDs {
		return nil, fmt.Errorf("value asks for %d JWT-SVIDs, more than the %d allowed", jwts, MaxJWTSVIDs)
	}
	seen := map[string]bool{}
	for i := range ds {
		d := &ds[i]
		if err := d.normalize(); err != nil {
			return nil, fmt.Errorf("delivery %d: %w", i, err)
		}
		if seen[d.CertDir] {
			return nil, fmt.Errorf("delivery %d: cert_dir %q is used twice", i, d.CertDir)
		}
		seen[d.CertDir] = true
	}
	for i := range ds {
		for j := range ds {
			if i != j && strings.HasPrefix(ds[j].CertDir, ds[i].CertDir+"/") {
				return nil, fmt.Errorf("delivery %d: cert_dir %q lies inside cert_dir %q", j, ds[j].CertDir, ds[i].CertDir)
			}
		}
	}
	return ds, nil
}

func (d *Delivery) normalize() error {
	if err := checkCertDir(d.CertDir); err != nil {
		return err
	}
	switch d.Layout {
	case "":
	case LayoutSPIFFEFS:
		return d.checkSPIFFEFS()
	default:
		return fmt.Errorf("layout %q is not known: use %q or leave layout out", printableOr(d.Layout), LayoutSPIFFEFS)
	}
	for _, f := range []struct {
		field string
		value *string
		def   string
	}{
		{"svid_file_name", &d.SVIDFileName, DefaultSVIDFileName},
		{"svid_key_file_name", &d.KeyFileName, DefaultKeyFileName},
		{"svid_bundle_file_name", &d.BundleFileName, DefaultBundleFileName},
	} {
		if *f.value == "" {
			*f.value = f.def
		}
		if err := checkFileName(*f.value); err != nil {
			return fmt.Errorf("%s: %w", f.field, err)
		}
	}
	if d.SVIDFileName == d.KeyFileName || d.SVIDFileName == d.BundleFileName || d.KeyFileName == d.BundleFileName {
		return fmt.Errorf("file names %q, %q and %q must differ", d.SVIDFileName, d.KeyFileName, d.BundleFileName)
	}
	if err := d.checkCredentialBundle(); err != nil {
		return err
	}
	return d.checkAgentFields()
}

// checkAgentFields checks the fields that say which identity and which
// agent, whatever the layout.
func (d *Delivery) checkAgentFields() error {
	if d.SPIFFEID != "" {
		if _, err := spiffeid.FromString(d.SPIFFEID); err != nil {
			return fmt.Errorf("spiffe_id %q is not a SPIFFE ID: %w", d.SPIFFEID, err)
		}
	}
	if !printable(d.SPIFFEID) || !printable(d.AgentAddress) {
		return errors.New("spiffe_id and spire_agent_address must be plain text")
	}
	if d.AgentAddress != "" && !path.IsAbs(d.AgentAddress) {
		return fmt.Errorf("spire_agent_address %q must be an absolute socket path", d.AgentAddress)
	}
	if err := d.checkJWT(); err != nil {
		return err
	}
	return checkRenewSignal(d.RenewSignal)
}

// checkSPIFFEFS checks a spiffe-fs delivery: the layout fixes every file
// name and never merges bundles, so the fields that choose otherwise are
// refused rather than ignored.
func (d *Delivery) checkSPIFFEFS() error {
	for _, f := range []struct {
		field string
		set   bool
	}{
		{"svid_file_name", d.SVIDFileName != ""},
		{"svid_key_file_name", d.KeyFileName != ""},
		{"svid_bundle_file_name", d.BundleFileName != ""},
		{"credential_bundle_file_name", d.CredentialBundleFileName != ""},
		{"include_federated_domains", bool(d.IncludeFederatedDomains)},
		{"jwt_svids", len(d.JWTSVIDs) > 0},
		{"jwt_bundle_file_name", d.JWTBundleFileName != ""},
	} {
		if f.set {
			return fmt.Errorf("%s cannot be used with layout %s, which writes exactly %s and one <trust-domain>%s per trust domain", f.field, LayoutSPIFFEFS, SPIFFEFSCredentialBundle, SPIFFEFSTrustBundleSuffix)
		}
	}
	return d.checkAgentFields()
}

// checkCredentialBundle checks the optional one-file credential name: a
// plain name that no other file of the delivery uses.
func (d *Delivery) checkCredentialBundle() error {
	name := d.CredentialBundleFileName
	if name == "" {
		return nil
	}
	if err := checkFileName(name); err != nil {
		return fmt.Errorf("credential_bundle_file_name: %w", err)
	}
	for _, other := range []string{d.SVIDFileName, d.KeyFileName, d.BundleFileName} {
		if name == other {
			return fmt.Errorf("credential_bundle_file_name %q must differ from the other file names (%q, %q, %q)", name, d.SVIDFileName, d.KeyFileName, d.BundleFileName)
		}
	}
	return nil
}

func checkCertDir(p string) error {
	switch {
	case p == "":
		return errors.New("cert_dir is required")
	case len(p) > maxPathLen:
		return fmt.Errorf("cert_dir is longer than %d bytes", maxPathLen)
	case !printable(p):
		return fmt.Errorf("cert_dir %q holds control, format or non-UTF-8 characters", p)
	case !path.IsAbs(p):
		return fmt.Errorf("cert_dir %q must be an absolute path inside the container", p)
	case hasDotDot(p):
		return fmt.Errorf("cert_dir %q must not contain '..'", p)
	case path.Clean(p) != p:
		return fmt.Errorf("cert_dir %q must be a clean path (no '.', '//' or trailing '/')", p)
	case p == "/":
		return errors.New("cert_dir must not be the container's root")
	case onKernelFS(p):
		return fmt.Errorf("cert_dir %q lies on a kernel filesystem that the runtime mounts (/dev, /proc, /sys): an identity there would hide the kernel's files; choose a cert_dir outside them", p)
	}
	return nil
}

// kernelDirs are where runtimes mount the kernel's filesystems (devtmpfs
// or tmpfs with devpts, mqueue and shm below it, procfs, sysfs with
// cgroupfs below it). Stacked there, the identity hides them: runc fails
// later without the hook's line (/dev, /proc), or the container starts
// with /sys or /dev/shm hidden. This catches a cert_dir as written;
// internal/mount refuses the same directories when an image's symlink
// leads there.
var kernelDirs = []string{"/dev", "/proc", "/sys"}

func onKernelFS(p string) bool {
	for _, d := range kernelDirs {
		if p == d || strings.HasPrefix(p, d+"/") {
			return true
		}
	}
	return false
}

func checkFileName(name string) error {
	switch {
	case len(name) > maxNameLen:
		return fmt.Errorf("file name is longer than %d bytes", maxNameLen)
	case strings.ContainsRune(name, '/'):
		return fmt.Errorf("file name %q must not contain '/'", name)
	case !printable(name):
		return fmt.Errorf("file name %q holds control, format or non-UTF-8 characters", name)
	case name == "." || strings.HasPrefix(name, ".."):
		// Names starting with ".." are the writer's own (..data and the
		// generation directories).
		return fmt.Errorf("file name %q is reserved", name)
	case strings.HasSuffix(name, TrustBundleSuffix):
		// The per-trust-domain bundles' names; a chosen name must not
		// stand in for one.
		return fmt.Errorf("file name %q is reserved: names ending in %q are the per-trust-domain bundles", name, TrustBundleSuffix)
	}
	return nil
}

func hasDotDot(p string) bool {
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return true
		}
	}
	return false
}

// printable rejects what YAML can smuggle past the raw-value check
// (!!binary decodes to any bytes), control characters, and format
// characters such as U+202E that make a path read differently in logs.
func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) || unicode.Is(unicode.Cf, r) {
			return false
		}
	}
	return true
}

// printableOr quotes s for a message only if it is printable.
func printableOr(s string) string {
	if printable(s) && len(s) <= maxNameLen {
		return s
	}
	return "(unprintable or too long)"
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
