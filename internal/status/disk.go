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
	"github.com/noderesource/spiffe-oci-hook/internal/record"
)

// ReadDelivery reads delivery i of rec from the state directory: the
// leaf certificate of its current generation and when that generation
// was put in place (the "..data" swap).
func ReadDelivery(store record.Store, rec record.Record, i int) (leaf *x509.Certificate, written time.Time, err error) {
	dir := store.DeliveryDir(rec.ID, i)
	name := rec.Deliveries[i].Names().SVID
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
	b, _ := pem.Decode(got[name])
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, written, fmt.Errorf("%s: no PEM certificate", filepath.Join(dir, name))
	}
	leaf, err = x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, written, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
	}
	return leaf, written, nil
}

// FromDisk is container rec's report line as the state directory alone
// tells it: what the status command shows when the refresher is down.
func FromDisk(store record.Store, rec record.Record) Container {
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
