package hook

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// equivCase is one annotation whose first delivery (the hook) and
// rotation (the refresher) must write the same files.
type equivCase struct {
	name       string
	annotation string
	// federate: the trust domains the agent federates with at delivery.
	federate []string
	// ids: the SVIDs the agent returns for the container (default: one).
	ids []string
	// uidMap: the container runs in a user namespace, its uid 0 being
	// host uid 100000.
	uidMap bool
	// files: what the hook writes, "<delivery>/<name>", in name order.
	files []string
	// between runs after the hook's delivery, before the refresher starts.
	between func(t *testing.T, fake *fakeagent.Agent)
	// changed: files whose shape the rotation changes on purpose (the
	// agent changed between the two), "" for a file the rotation removes.
	// Their link, mode and owner stay the hook's.
	changed map[string]string
	// holdJWT: the agent holds the refresher's JWT-SVID requests, so that
	// its first rotation carries the hook's tokens over.
	holdJWT bool
}

const (
	jwtTokens   = "  jwt_svids:\n  - {jwt_audience: db, jwt_svid_file_name: db.token}\n  - {jwt_audience: web, jwt_extra_audiences: [api], jwt_svid_file_name: web.token}\n"
	jwtBundle   = "  jwt_bundle_file_name: jwt_bundle.json\n"
	classic     = "0/svid.pem 0/svid_bundle.pem 0/svid_key.pem 0/example.org.trust-bundle.pem"
	spiffeFS    = "0/credential-bundle.private-key.x509.pem 0/example.org.spiffe-trust-bundle.x509.pem"
	sidecarName = "spiffe://example.org/sidecar"
)

// equivCases are the layouts the annotation supports (internal/annotations)
// and their combinations.
var equivCases = []equivCase{
	{name: "default", annotation: "- cert_dir: /certs\n", files: strings.Fields(classic)},
	{
		name:       "file names",
		annotation: "- cert_dir: /certs\n  svid_file_name: tls.crt\n  svid_key_file_name: tls.key\n  svid_bundle_file_name: ca.crt\n",
		files:      []string{"0/ca.crt", "0/example.org.trust-bundle.pem", "0/tls.crt", "0/tls.key"},
	},
	{
		name:       "credential bundle",
		annotation: "- cert_dir: /certs\n  credential_bundle_file_name: credentials.pem\n",
		files:      append(strings.Fields(classic), "0/credentials.pem"),
	},
	{
		name:       "federated, one trust bundle file per trust domain",
		annotation: "- cert_dir: /certs\n",
		federate:   []string{"other.org", "partner.test"},
		files:      append(strings.Fields(classic), "0/other.org.trust-bundle.pem", "0/partner.test.trust-bundle.pem"),
	},
	{
		name:       "include_federated_domains",
		annotation: "- cert_dir: /certs\n  include_federated_domains: true\n",
		federate:   []string{"other.org", "partner.test"},
		files:      append(strings.Fields(classic), "0/other.org.trust-bundle.pem", "0/partner.test.trust-bundle.pem"),
	},
	{
		name:       "federation ended before the rotation: its file goes",
		annotation: "- cert_dir: /certs\n",
		federate:   []string{"other.org"},
		files:      append(strings.Fields(classic), "0/other.org.trust-bundle.pem"),
		between:    func(t *testing.T, fake *fakeagent.Agent) { fake.Defederate("other.org") },
		changed:    map[string]string{"0/other.org.trust-bundle.pem": ""},
	},
	{name: "spiffe-fs", annotation: "- cert_dir: /certs\n  layout: spiffe-fs\n", files: strings.Fields(spiffeFS)},
	{
		name:       "spiffe-fs, federated",
		annotation: "- cert_dir: /certs\n  layout: spiffe-fs\n",
		federate:   []string{"other.org", "partner.test"},
		files:      append(strings.Fields(spiffeFS), "0/other.org.spiffe-trust-bundle.x509.pem", "0/partner.test.spiffe-trust-bundle.x509.pem"),
	},
	{
		name:       "spiffe-fs, federation ended before the rotation: redacted",
		annotation: "- cert_dir: /certs\n  layout: spiffe-fs\n",
		federate:   []string{"other.org"},
		files:      append(strings.Fields(spiffeFS), "0/other.org.spiffe-trust-bundle.x509.pem"),
		between:    func(t *testing.T, fake *fakeagent.Agent) { fake.Defederate("other.org") },
		changed:    map[string]string{"0/other.org.spiffe-trust-bundle.x509.pem": "empty"},
	},
	{
		name:       "JWT-SVIDs",
		annotation: "- cert_dir: /certs\n" + jwtTokens,
		files:      append(strings.Fields(classic), "0/db.token", "0/web.token"),
	},
	{
		name:       "JWT bundle",
		annotation: "- cert_dir: /certs\n" + jwtBundle,
		files:      append(strings.Fields(classic), "0/jwt_bundle.json"),
	},
	{
		name: "everything at once",
		annotation: "- cert_dir: /certs\n  svid_file_name: tls.crt\n  credential_bundle_file_name: credentials.pem\n  include_federated_domains: true\n" +
			jwtTokens + jwtBundle,
		federate: []string{"other.org"},
		files: []string{"0/credentials.pem", "0/db.token", "0/example.org.trust-bundle.pem", "0/jwt_bundle.json", "0/other.org.trust-bundle.pem",
			"0/svid_bundle.pem", "0/svid_key.pem", "0/tls.crt", "0/web.token"},
	},
	{
		name:       "JWT-SVIDs not renewed yet: carried over",
		annotation: "- cert_dir: /certs\n" + jwtTokens + jwtBundle,
		files:      append(strings.Fields(classic), "0/db.token", "0/jwt_bundle.json", "0/web.token"),
		holdJWT:    true,
	},
	{
		name:       "two deliveries, spiffe_id picks the second SVID",
		annotation: "- cert_dir: /certs\n  spiffe_id: " + sidecarName + "\n" + jwtTokens + "- cert_dir: /spiffe\n  layout: spiffe-fs\n",
		ids:        []string{equivWorkload, sidecarName},
		federate:   []string{"other.org"},
		files: append(append(strings.Fields(classic), "0/db.token", "0/other.org.trust-bundle.pem", "0/web.token"),
			"1/credential-bundle.private-key.x509.pem", "1/example.org.spiffe-trust-bundle.x509.pem", "1/other.org.spiffe-trust-bundle.x509.pem"),
	},
	{name: "user namespace", annotation: "- cert_dir: /certs\n  credential_bundle_file_name: credentials.pem\n", uidMap: true, files: append(strings.Fields(classic), "0/credentials.pem")},
}

const equivWorkload = "spiffe://example.org/workload"

// TestHookRefresherEquivalence: for every layout, the refresher's rotation
// writes what the hook's first delivery wrote: the same names, each a link
// through ..data, with the same modes and owners, and content of the same
// shape (PEM block types and whose certificates, JSON keys, token subject
// and audiences). Both sides run for real against the fake agent: the
// hook's Create, then a refresher serving the record it left, which
// rotates every delivery from its own SVID stream, JWT-SVID requests and
// bundle streams.
func TestHookRefresherEquivalence(t *testing.T) {
	for _, c := range equivCases {
		t.Run(c.name, func(t *testing.T) { c.run(t) })
	}
}

// TestHandoffEquivalence: a container the refresher takes over from the
// hook (package handoff) gets what the hook itself would write: the same
// names, each a link through ..data, with the same modes, owners and
// content shapes, for every layout.
func TestHandoffEquivalence(t *testing.T) {
	for _, c := range equivCases {
		t.Run(c.name, func(t *testing.T) {
			_, cfg, req, _ := c.deliverFirst(t, false)
			direct, _ := describeDeliveries(t, statedir.Store{Dir: cfg.StateDir}, "c", len(req.Deliveries))
			_, cfg, req, _ = c.deliverFirst(t, true)
			store := statedir.Store{Dir: cfg.StateDir}
			handed, _ := describeDeliveries(t, store, "c", len(req.Deliveries))
			compareDeliveries(t, "taken over by the refresher", direct, handed)
			rec, err := store.Load("c")
			if err != nil {
				t.Fatalf("no record after the handoff: %v", err)
			}
			if len(rec.Deliveries) != len(req.Deliveries) || rec.PID != req.State.Pid {
				t.Fatalf("record %+v; want pid %d and %d deliveries", rec, req.State.Pid, len(req.Deliveries))
			}
		})
	}
}

// deliverFirst makes a node with the fake agent and the case's container,
// and delivers its identity: by the hook itself, or through a refresher
// (viaRefresher) that takes it over on the handoff socket.
func (c equivCase) deliverFirst(t *testing.T, viaRefresher bool) (_ *fakeagent.Agent, cfg config.Config, req *Request, owner files.Owner) {
	dir, _, fake, cfg := agentNode(t, 16)
	ids := c.ids
	if ids == nil {
		ids = []string{equivWorkload}
	}
	for _, id := range ids {
		fake.Default = append(fake.Default, spiffeid.RequireFromString(id))
	}
	for _, td := range c.federate {
		if _, err := fake.Federate(td); err != nil {
			t.Fatal(err)
		}
	}
	spec := specs.Spec{Root: &specs.Root{Path: "rootfs"}, Process: &specs.Process{User: specs.User{UID: 1000, GID: 1000}}}
	owner = files.Owner{UID: 1000, GID: 1000}
	if c.uidMap {
		m := []specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}}
		spec.Linux = &specs.Linux{UIDMappings: m, GIDMappings: m}
		owner = files.Owner{UID: 101000, GID: 101000}
	}
	bundle := writeBundle(dir, spec)

	req, err := Find(&specs.State{ID: "c", Pid: testhelp.StandIn(t), Bundle: bundle, Annotations: map[string]string{annotations.Key: c.annotation}})
	if err != nil || req == nil {
		t.Fatalf("Find: %v %v", req, err)
	}
	h := directHook(cfg)
	if viaRefresher {
		startRefresher(t, cfg, nil)
		h.Deliver = h.Handoff
	}
	if err := h.Create(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	return fake, cfg, req, owner
}

func (c equivCase) run(t *testing.T) {
	fake, cfg, req, owner := c.deliverFirst(t, false)
	state := cfg.StateDir
	store := statedir.Store{Dir: state}
	first, firstData := describeDeliveries(t, store, "c", len(req.Deliveries))
	if got := slices.Sorted(maps.Keys(first)); !slices.Equal(got, slices.Sorted(slices.Values(c.files))) {
		t.Fatalf("the hook wrote %q, want %q", got, c.files)
	}
	for name, f := range first {
		if f.UID != uint32(owner.UID) || f.GID != uint32(owner.GID) {
			t.Fatalf("the hook wrote %s owned by %d:%d, want the container user's %d:%d", name, f.UID, f.GID, owner.UID, owner.GID)
		}
	}

	// What the hook wrote with the agent as it was; the rotation's JWT
	// bundle comes from a new key, so that one carried over shows.
	if err := fake.RotateJWTKey(); err != nil {
		t.Fatal(err)
	}
	if c.between != nil {
		c.between(t, fake)
	}
	hold := make(chan struct{})
	if c.holdJWT {
		fake.Configure(func(a *fakeagent.Agent) { a.JWTHold = hold })
	}
	startRefresher(t, cfg, nil)

	want := make(map[string]fileDesc, len(first))
	for name, f := range first {
		if s, ok := c.changed[name]; ok {
			if s == "" {
				continue
			}
			f.Shape = s
		}
		want[name] = f
	}
	if c.holdJWT {
		// The certificate rotates while the refresher has no tokens of
		// its own: the hook's stay, byte for byte.
		got, gotData := waitRotation(t, store, "c", len(req.Deliveries), firstData, "x509")
		compareDeliveries(t, "rotation before the refresher's first tokens", want, got)
		for name, b := range firstData {
			if rotates(b) == "jwt-svid" && !bytes.Equal(gotData[name], b) {
				t.Errorf("%s changed before the refresher had a token of its own", name)
			}
		}
		close(hold)
	}
	got, _ := waitRotation(t, store, "c", len(req.Deliveries), firstData, "x509", "jwt-svid", "jwt-bundle")
	compareDeliveries(t, "rotation", want, got)
}

// fileDesc is what a delivery directory says of one file.
type fileDesc struct {
	Link     string // the plain name's symlink target
	Mode     os.FileMode
	UID, GID uint32
	Shape    string
}

func (f fileDesc) String() string {
	return fmt.Sprintf("link %s, mode %04o, owner %d:%d, %s", f.Link, f.Mode, f.UID, f.GID, f.Shape)
}

// describeDeliveries describes the current generation of each of
// container id's n delivery directories, by "<delivery>/<name>", and
// returns each file's content.
func describeDeliveries(t *testing.T, store statedir.Store, id string, n int) (map[string]fileDesc, map[string][]byte) {
	t.Helper()
	desc, data := map[string]fileDesc{}, map[string][]byte{}
	for i := range n {
		dir := store.DeliveryDir(id, i)
		var err error
		// A rotation may swap ..data meanwhile: read again until one
		// generation was read whole.
		for range 100 {
			if err = describeGeneration(dir, fmt.Sprintf("%d/", i), desc, data); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return desc, data
}

func describeGeneration(dir, prefix string, desc map[string]fileDesc, data map[string][]byte) error {
	gen, err := os.Readlink(filepath.Join(dir, files.DataLink))
	if err != nil {
		return err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	genEntries, err := os.ReadDir(filepath.Join(dir, gen))
	if err != nil {
		return err
	}
	d, b := map[string]fileDesc{}, map[string][]byte{}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "..") {
			continue // generations, ..data, the writer's temporary links
		}
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			link = "none (" + e.Type().String() + ")"
		}
		d[e.Name()] = fileDesc{Link: link, Shape: "no file in the generation"}
	}
	for _, e := range genEntries {
		p := filepath.Join(dir, gen, e.Name())
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		content, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		sys := st.Sys().(*syscall.Stat_t)
		f := d[e.Name()]
		if f.Link == "" {
			f.Link = "none"
		}
		f.Mode, f.UID, f.GID, f.Shape = st.Mode(), sys.Uid, sys.Gid, shape(content)
		d[e.Name()], b[e.Name()] = f, content
	}
	if again, err := os.Readlink(filepath.Join(dir, files.DataLink)); err != nil || again != gen {
		return fmt.Errorf("%s: ..data moved while it was read", dir)
	}
	for name, f := range d {
		desc[prefix+name], data[prefix+name] = f, b[name]
	}
	return nil
}

// shape describes a file's content, leaving out what every fetch changes.
func shape(data []byte) string {
	if len(data) == 0 {
		return "empty"
	}
	if bytes.HasPrefix(data, []byte("-----BEGIN ")) {
		var parts []string
		rest := data
		for {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				break
			}
			parts = append(parts, pemShape(b))
		}
		if len(bytes.TrimSpace(rest)) > 0 {
			parts = append(parts, "trailing data")
		}
		return "PEM: " + strings.Join(parts, ", ")
	}
	var doc map[string]string
	if json.Unmarshal(data, &doc) == nil {
		return "JSON keys " + strings.Join(slices.Sorted(maps.Keys(doc)), ", ")
	}
	if parts := strings.Split(string(data), "."); len(parts) == 3 {
		var claims struct {
			Sub string          `json:"sub"`
			Aud json.RawMessage `json:"aud"`
		}
		payload, err := base64.RawURLEncoding.DecodeString(parts[1])
		if err == nil && json.Unmarshal(payload, &claims) == nil {
			// One audience is a string, more a list (RFC 7519).
			var auds []string
			if json.Unmarshal(claims.Aud, &auds) != nil {
				auds = make([]string, 1)
				json.Unmarshal(claims.Aud, &auds[0])
			}
			return fmt.Sprintf("JWT for %s, audiences %s", claims.Sub, strings.Join(auds, " "))
		}
	}
	return "unknown content"
}

func pemShape(b *pem.Block) string {
	if b.Type != "CERTIFICATE" {
		return b.Type
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return "unparsable CERTIFICATE"
	}
	uri := "no URI"
	if len(c.URIs) > 0 {
		uri = c.URIs[0].String()
	}
	if c.IsCA {
		return "CA " + uri
	}
	return "leaf " + uri
}

// rotates names the material of a file that a rotation replaces ("x509":
// a key or a leaf certificate; "jwt-svid"; "jwt-bundle"), "" for one the
// fake agent keeps (trust bundles, an empty file).
func rotates(data []byte) string {
	s := shape(data)
	switch {
	case strings.HasPrefix(s, "PEM: "):
		for _, p := range strings.Split(strings.TrimPrefix(s, "PEM: "), ", ") {
			if !strings.HasPrefix(p, "CA ") {
				return "x509"
			}
		}
	case strings.HasPrefix(s, "JWT "):
		return "jwt-svid"
	case strings.HasPrefix(s, "JSON "):
		return "jwt-bundle"
	}
	return ""
}

// waitRotation waits until every file of first that holds material of
// the kinds given has new content, and describes the deliveries then.
func waitRotation(t *testing.T, store statedir.Store, id string, n int, first map[string][]byte, kinds ...string) (map[string]fileDesc, map[string][]byte) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		desc, data := describeDeliveries(t, store, id, n)
		var stale []string
		for name, b := range first {
			if slices.Contains(kinds, rotates(b)) && bytes.Equal(data[name], b) {
				stale = append(stale, name)
			}
		}
		if len(stale) == 0 {
			return desc, data
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10 s the refresher has not rewritten %q", stale)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// compareDeliveries reports every file whose description differs from
// want's (the hook's, but for the files the case changes on purpose).
func compareDeliveries(t *testing.T, what string, want, got map[string]fileDesc) {
	t.Helper()
	names := slices.Sorted(maps.Keys(want))
	for name := range got {
		if _, ok := want[name]; !ok {
			names = append(names, name)
		}
	}
	for _, name := range names {
		w, inWant := want[name]
		g, inGot := got[name]
		switch {
		case !inGot:
			t.Errorf("%s: %s is missing; want %s", what, name, w)
		case !inWant:
			t.Errorf("%s: %s was written (%s); the hook did not write it", what, name, g)
		case w != g:
			t.Errorf("%s: %s differs:\n  want: %s\n  got:  %s", what, name, w, g)
		}
	}
}
