package cri

import (
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// TestCRIO runs the scenarios under CRI-O, on one CRI-O and one SPIRE.
func TestCRIO(t *testing.T) {
	requireTools(t)
	n := newNode(t, tempDir(t, "node-"))
	r := startCRIO(t, n)
	scenarios(t, r)
}

// scenarios are what both runtimes must do, in order, on one runtime.
func scenarios(t *testing.T, r *runtime) {
	t.Run("two pods in different namespaces each read their own identity first", func(t *testing.T) { twoNamespaces(t, r) })
}

// printCert is the first thing a container does: print its certificate.
const printCert = `echo "=== cert ==="; cat /certs/svid.pem; echo "=== end cert ==="; `

// certID parses the certificate a container printed and returns its
// SPIFFE ID.
func certID(t *testing.T, out string) string {
	t.Helper()
	i, j := strings.Index(out, "=== cert ===\n"), strings.Index(out, "=== end cert ===")
	if i < 0 || j < i {
		t.Fatalf("the container printed no certificate:\n%s", out)
	}
	block, _ := pem.Decode([]byte(out[i+len("=== cert ===\n") : j]))
	if block == nil {
		t.Fatalf("the container printed no PEM certificate:\n%s", out)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatalf("the container's certificate: %v\n%s", err, out)
	}
	id, err := x509svid.IDFromCert(cert)
	if err != nil {
		t.Fatal(err)
	}
	return id.String()
}

// twoNamespaces: two pods in different namespaces, each with the unnamed
// annotation, each read their own SPIFFE ID as their command's first step.
func twoNamespaces(t *testing.T, r *runtime) {
	n := r.node
	idA := n.register(t, "shop", "default", time.Hour)
	idB := n.register(t, "bank", "default", time.Hour)
	ann := map[string]string{annotation: "- cert_dir: /certs\n"}
	a := r.runPod(t, "web", "shop", ann)
	b := r.runPod(t, "web", "bank", ann)
	ca := a.mustRun(t, "app", 0, printCert+"echo DONE")
	cb := b.mustRun(t, "app", 0, printCert+"echo DONE")
	if got := certID(t, ca.waitLog(t, "DONE")); got != idA {
		t.Errorf("pod in shop read %s, want %s", got, idA)
	}
	if got := certID(t, cb.waitLog(t, "DONE")); got != idB {
		t.Errorf("pod in bank read %s, want %s", got, idB)
	}
}
