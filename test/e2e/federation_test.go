package e2e

// Federation against two real SPIRE servers federated with each other:
// each serves its bundle endpoint on localhost (https_spiffe), and each
// was given the other's bundle as a SPIFFE document.

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const (
	federatedID = "spiffe://example.org/workload/federated"
	partnerTD   = "partner.test"
)

// sleeper is a detached runc container that only sleeps; tests read its
// files through `runc exec`, as the container sees them.
type sleeper struct {
	b    *bundle
	root string
}

func (e *env) startSleeper(t *testing.T, ann string) *sleeper {
	t.Helper()
	b := newBundle(t, []string{"/bin/sleep", "600"})
	b.AddAnnotation(annotation, ann)
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	b.save(t)
	s := &sleeper{b: b, root: filepath.Join(b.dir, "runc-root")}
	// The container inherits runc's stdio: a file, not a pipe, or the
	// detached container would hold the pipe open forever.
	out := filepath.Join(b.dir, "out")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("runc", "--root", s.root, "run", "--detach", "--bundle", b.dir, b.id)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Run(); err != nil {
		t.Fatalf("runc run --detach: %v: %s", err, readFile(out))
	}
	t.Cleanup(func() { exec.Command("runc", "--root", s.root, "delete", "--force", b.id).Run() })
	return s
}

// exec runs args in the container and returns its stdout ("" on failure).
func (s *sleeper) exec(args ...string) string {
	var out bytes.Buffer
	cmd := exec.Command("runc", append([]string{"--root", s.root, "exec", s.b.id}, args...)...)
	cmd.Stdout = &out
	if cmd.Run() != nil {
		return ""
	}
	return out.String()
}

// files lists /certs as the container sees it, without the writer's "..*"
// entries.
func (s *sleeper) files() []string {
	var names []string
	for _, n := range strings.Fields(s.exec("ls", "-a", "/certs")) {
		if !strings.HasPrefix(n, ".") {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return names
}

// certs reads /certs/name in the container as certificates (nil if it is
// missing or holds anything else).
func (s *sleeper) certs(name string) []*x509.Certificate {
	return pemCertificates([]byte(s.exec("cat", "/certs/"+name)))
}

func pemCertificates(data []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for rest := data; len(bytes.TrimSpace(rest)) > 0; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil || blk.Type != "CERTIFICATE" || len(blk.Headers) != 0 {
			return nil
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil
		}
		out = append(out, c)
	}
	return out
}

// sameCerts reports whether got holds exactly want, in any order.
func sameCerts(got, want []*x509.Certificate) bool {
	if len(got) != len(want) {
		return false
	}
	for _, w := range want {
		if !slices.ContainsFunc(got, w.Equal) {
			return false
		}
	}
	return true
}

// merged reports whether got is own's certificates followed by foreign's.
func merged(got, own, foreign []*x509.Certificate) bool {
	return len(got) == len(own)+len(foreign) && sameCerts(got[:len(own)], own) && sameCerts(got[len(own):], foreign)
}

// waitFor polls every 500 ms (the conditions exec into containers),
// explains a failure with what the containers held, and logs how long the
// change took to reach them.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool, explain func() string) {
	t.Helper()
	took := testhelp.Poll{Every: 500 * time.Millisecond, Explain: explain}.Eventually(t, d, what, cond)
	t.Logf("%s after %s", what, took.Round(100*time.Millisecond))
}

// TestFederationTwoServers: a container whose entry federates with
// partner.test gets one file per trust domain and an svid_bundle.pem with
// its own trust domain only; one that asks include_federated_domains gets
// the merged file; a CA rotation of the foreign server reaches both
// containers' files; and when the entry stops federating, the foreign
// file goes and the merged file shrinks, while the containers run. A
// third container with layout spiffe-fs sees exactly the draft standard's
// files, and the withdrawn domain's file emptied rather than removed.
func TestFederationTwoServers(t *testing.T) {
	e := startEnvOptions(t, spiretest.Options{BundleEndpoint: true})
	partner := spiretest.Start(t, spiretest.Options{TrustDomain: partnerTD, ServerOnly: true, BundleEndpoint: true})
	e.spire.Federate(t, partner)
	partner.Federate(t, e.spire)
	entry := e.spire.CreateFederatedEntry(t, federatedID, []string{"unix:uid:0"}, time.Hour, partnerTD)
	e.waitSynced()
	e.startRefresher(t)

	safe := e.startSleeper(t, "- cert_dir: /certs\n  credential_bundle_file_name: credential-bundle.pem\n")
	wide := e.startSleeper(t, "- cert_dir: /certs\n  include_federated_domains: true\n")
	draft := e.startSleeper(t, "- cert_dir: /certs\n  layout: spiffe-fs\n")
	own := pemCertificates(e.spire.BundlePEM(t))
	foreign := pemCertificates(partner.BundlePEM(t))
	if len(own) == 0 || len(foreign) == 0 {
		t.Fatalf("bundles: own %d, foreign %d certificates", len(own), len(foreign))
	}
	explain := func() string {
		return fmt.Sprintf("safe sees %v, svid_bundle %d certs, partner file %d certs; wide sees %v, svid_bundle %d certs",
			safe.files(), len(safe.certs("svid_bundle.pem")), len(safe.certs("partner.test.trust-bundle.pem")), wide.files(), len(wide.certs("svid_bundle.pem")))
	}

	t.Run("one file per trust domain, own domain only by default", func(t *testing.T) {
		want := []string{"credential-bundle.pem", "example.org.trust-bundle.pem", "partner.test.trust-bundle.pem", "svid.pem", "svid_bundle.pem", "svid_key.pem"}
		waitFor(t, time.Minute, "both trust bundle files in the container", func() bool {
			return slices.Equal(safe.files(), want) && sameCerts(safe.certs("partner.test.trust-bundle.pem"), foreign)
		}, explain)
		if !sameCerts(safe.certs("example.org.trust-bundle.pem"), own) {
			t.Error("example.org.trust-bundle.pem is not the own server's bundle")
		}
		if !sameCerts(safe.certs("svid_bundle.pem"), own) {
			t.Errorf("svid_bundle.pem holds %d certificates, want the own trust domain's %d only", len(safe.certs("svid_bundle.pem")), len(own))
		}
		// The credential bundle, from real SPIRE: key first, then the
		// chain, an SVID for the entry that chains to its own domain's
		// file (and not to the foreign one).
		cb := []byte(safe.exec("cat", "/certs/credential-bundle.pem"))
		if blk, _ := pem.Decode(cb); blk == nil || blk.Type != "PRIVATE KEY" {
			t.Fatal("credential-bundle.pem does not start with a PRIVATE KEY block")
		}
		svid, err := x509svid.Parse(cb, cb)
		if err != nil || svid.ID.String() != federatedID {
			t.Fatalf("credential-bundle.pem: %v (%v)", err, svid)
		}
		td := spiffeid.RequireTrustDomainFromString(trustDomain)
		if _, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(td, safe.certs("example.org.trust-bundle.pem"))); err != nil {
			t.Errorf("the SVID does not verify against example.org.trust-bundle.pem: %v", err)
		}
		if stat := strings.Fields(safe.exec("stat", "-L", "-c", "%a", "/certs/credential-bundle.pem")); len(stat) != 1 || stat[0] != "600" {
			t.Errorf("credential-bundle.pem mode %v, want 600", stat)
		}
	})

	t.Run("layout spiffe-fs writes exactly the draft standard's files", func(t *testing.T) {
		want := []string{"credential-bundle.private-key.x509.pem", "example.org.spiffe-trust-bundle.x509.pem", "partner.test.spiffe-trust-bundle.x509.pem"}
		waitFor(t, time.Minute, "the draft's file set", func() bool {
			return slices.Equal(draft.files(), want) && sameCerts(draft.certs("partner.test.spiffe-trust-bundle.x509.pem"), foreign)
		}, func() string { return fmt.Sprintf("draft sees %v", draft.files()) })
		if !sameCerts(draft.certs("example.org.spiffe-trust-bundle.x509.pem"), own) {
			t.Error("example.org.spiffe-trust-bundle.x509.pem is not the own server's bundle")
		}
		cb := []byte(draft.exec("cat", "/certs/credential-bundle.private-key.x509.pem"))
		if blk, _ := pem.Decode(cb); blk == nil || blk.Type != "PRIVATE KEY" {
			t.Fatal("the credential bundle does not start with a PRIVATE KEY block")
		}
		if svid, err := x509svid.Parse(cb, cb); err != nil || svid.ID.String() != federatedID {
			t.Fatalf("credential bundle: %v (%v)", err, svid)
		}
	})

	t.Run("include_federated_domains merges", func(t *testing.T) {
		waitFor(t, time.Minute, "merged svid_bundle.pem", func() bool { return merged(wide.certs("svid_bundle.pem"), own, foreign) }, explain)
		if !slices.Contains(wide.files(), "partner.test.trust-bundle.pem") {
			t.Error("the merged delivery lacks the per-trust-domain file")
		}
	})

	t.Run("a foreign CA rotation reaches the containers", func(t *testing.T) {
		partner.PrepareX509Authority(t)
		rotated := pemCertificates(partner.BundlePEM(t))
		if len(rotated) <= len(foreign) {
			t.Fatalf("partner's bundle holds %d certificates after prepare, want more than %d", len(rotated), len(foreign))
		}
		// Nothing pokes the local server: it fetches partner's bundle from
		// partner's endpoint (https_spiffe) on its own schedule, every 15 s
		// with partner's 1-minute refresh hint.
		waitFor(t, 2*time.Minute, "rotated foreign bundle in both containers", func() bool {
			return sameCerts(safe.certs("partner.test.trust-bundle.pem"), rotated) && merged(wide.certs("svid_bundle.pem"), own, rotated)
		}, explain)
		if !sameCerts(safe.certs("svid_bundle.pem"), own) {
			t.Error("the foreign rotation entered the unmerged svid_bundle.pem")
		}
	})

	t.Run("the federation ends", func(t *testing.T) {
		e.spire.DeleteEntry(t, entry)
		e.spire.CreateEntry(t, federatedID, []string{"unix:uid:0"}, time.Hour)
		waitFor(t, 90*time.Second, "foreign file removed and merged file back to the own domain", func() bool {
			return !slices.Contains(safe.files(), "partner.test.trust-bundle.pem") && !slices.Contains(wide.files(), "partner.test.trust-bundle.pem") &&
				sameCerts(wide.certs("svid_bundle.pem"), own)
		}, explain)
		// The draft standard redacts with an empty file (its section 2.3).
		waitFor(t, 30*time.Second, "spiffe-fs trust bundle redacted", func() bool {
			return slices.Contains(draft.files(), "partner.test.spiffe-trust-bundle.x509.pem") && draft.exec("cat", "/certs/partner.test.spiffe-trust-bundle.x509.pem") == "" &&
				draft.exec("ls", "/certs/partner.test.spiffe-trust-bundle.x509.pem") != ""
		}, func() string { return fmt.Sprintf("draft sees %v", draft.files()) })
		if !sameCerts(safe.certs("example.org.trust-bundle.pem"), own) || safe.exec("cat", "/certs/credential-bundle.pem") == "" {
			t.Error("the own files went with the foreign one")
		}
		if _, err := os.Stat(filepath.Join(e.stateDir, "containers", safe.b.id, "0", "partner.test.trust-bundle.pem")); !os.IsNotExist(err) {
			t.Errorf("the foreign file's name is still in the state directory: %v", err)
		}
	})
}
