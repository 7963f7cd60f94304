package status

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/render"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// TestReadDeliveryLayouts: status reads the leaf from svid.pem, and from
// the credential bundle (after the key) in the spiffe-fs layout, which
// has no svid.pem.
func TestReadDeliveryLayouts(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	notAfter := time.Now().Add(time.Hour).Truncate(time.Second)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "leaf"}, NotBefore: time.Now().Add(-time.Minute), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8})

	for _, tc := range []struct {
		name string
		d    annotations.Delivery
		file files.File
	}{
		{"default", annotations.Delivery{SVIDFileName: annotations.DefaultSVIDFileName}, files.File{Name: annotations.DefaultSVIDFileName, Data: certPEM, Mode: files.CertMode}},
		{"spiffe-fs", annotations.Delivery{Layout: annotations.LayoutSPIFFEFS}, files.File{Name: annotations.SPIFFEFSCredentialBundle, Data: render.CredentialBundle(keyPEM, certPEM), Mode: files.KeyMode}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := statedir.Store{Dir: t.TempDir()}
			rec := statedir.Record{ID: "c1", Deliveries: []statedir.Delivery{{Delivery: tc.d}}}
			dir := store.DeliveryDir(rec.ID, 0)
			if err := os.MkdirAll(store.ContainerDir(rec.ID), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := (files.Writer{}).Write(dir, []files.File{tc.file}, files.Owner{UID: os.Getuid(), GID: os.Getgid()}); err != nil {
				t.Fatal(err)
			}
			leaf, written, err := ReadDelivery(store, rec, 0)
			if err != nil {
				t.Fatal(err)
			}
			if !leaf.NotAfter.Equal(notAfter) || written.IsZero() {
				t.Errorf("leaf not-after %v (want %v), written %v", leaf.NotAfter, notAfter, written)
			}
		})
	}
}
