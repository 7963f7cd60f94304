package status

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/render"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// ReadDelivery reads delivery i of rec from the state directory: the
// leaf certificate of its current generation and when that generation
// was put in place (the "..data" swap).
func ReadDelivery(store statedir.Store, rec statedir.Record, i int) (leaf *x509.Certificate, written time.Time, err error) {
	dir := store.DeliveryDir(rec.ID, i)
	// The leaf is the first certificate of the SVID file or, in a layout
	// that has none (spiffe-fs), of the credential bundle, where it follows
	// the key.
	names := render.NamesOf(rec.Deliveries[i].Delivery)
	name := names.SVID
	if name == "" && names.CredentialBundle != "" {
		name = names.CredentialBundle
	}
	if name == "" {
		name = annotations.DefaultSVIDFileName
	}
	if st, err := os.Lstat(filepath.Join(dir, files.DataLink)); err == nil {
		written = st.ModTime()
	}
	got, err := files.Read(dir, name)
	if err != nil {
		return nil, written, err
	}
	rest := got[name]
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return nil, written, fmt.Errorf("%s: no PEM certificate", filepath.Join(dir, name))
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		leaf, err = x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, written, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
		}
		break
	}
	return leaf, written, nil
}

// FromDisk is container rec's report line as the state directory alone
// tells it: what the status command shows when the refresher is down.
func FromDisk(store statedir.Store, rec statedir.Record) Container {
	c := Container{ID: rec.ID, PID: rec.PID}
	var errs []error
	for i, d := range rec.Deliveries {
		c.SPIFFEIDs = append(c.SPIFFEIDs, d.Delivered)
		leaf, written, err := ReadDelivery(store, rec, i)
		if written.After(c.LastRotation) {
			c.LastRotation = written
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("delivery %d: %w", i, err))
			continue
		}
		if c.NotAfter.IsZero() || leaf.NotAfter.Before(c.NotAfter) {
			c.NotAfter, c.NotBefore = leaf.NotAfter, leaf.NotBefore
		}
	}
	if err := errors.Join(errs...); err != nil {
		c.Error = err.Error()
	}
	return c
}
