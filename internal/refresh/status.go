package refresh

import (
	"crypto/x509"
	"slices"
	"strings"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/status"
)

// view is what Report tells about a container, kept under container.mu
// by the code paths that change it.
type view struct {
	streamOpen bool
	streamErr  string
	writeErr   string
	signalErr  string // renew_signal refused (container.signal)
	// Per delivery: the SPIFFE ID and validity of the SVID on disk.
	ids       []string
	notBefore []time.Time
	notAfter  []time.Time
	rotated   time.Time
}

// loadView reads what is on disk already (the refresher may have been
// restarted, or the agent may be down): the leaf certificate of every
// delivery and when its generation was written.
func (c *container) loadView() {
	n := len(c.rec.Deliveries)
	v := view{ids: make([]string, n), notBefore: make([]time.Time, n), notAfter: make([]time.Time, n)}
	for i, d := range c.rec.Deliveries {
		v.ids[i] = d.Delivered
		leaf, written, err := status.ReadDelivery(c.r.store, c.rec, i)
		if err == nil {
			v.notBefore[i], v.notAfter[i] = leaf.NotBefore, leaf.NotAfter
		}
		if written.After(v.rotated) {
			v.rotated = written
		}
	}
	c.mu.Lock()
	c.view = v
	c.mu.Unlock()
}

// noteDelivered records that delivery i now holds leaf for id; written
// says that this was a new generation, not files found current.
func (c *container) noteDelivered(i int, id string, leaf *x509.Certificate, written bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.view.ids[i] = id
	c.view.notBefore[i], c.view.notAfter[i] = leaf.NotBefore, leaf.NotAfter
	if written {
		c.view.rotated = time.Now()
	}
}

func (c *container) setStreamOpen(open bool) {
	c.mu.Lock()
	c.view.streamOpen = open
	c.mu.Unlock()
}

func (c *container) setWriteErr(msg string) {
	c.mu.Lock()
	c.view.writeErr = msg
	c.mu.Unlock()
}

// status returns the container's line of the report.
func (c *container) status() status.Container {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := c.view
	s := status.Container{ID: c.rec.ID, PID: c.rec.PID, LastRotation: v.rotated, StreamOpen: v.streamOpen}
	s.SPIFFEIDs = slices.Clone(v.ids)
	for i, na := range v.notAfter {
		if !na.IsZero() && (s.NotAfter.IsZero() || na.Before(s.NotAfter)) {
			s.NotAfter, s.NotBefore = na, v.notBefore[i]
		}
	}
	var errs []string
	for _, e := range []string{v.streamErr, v.writeErr, v.signalErr} {
		if e != "" {
			errs = append(errs, e)
		}
	}
	s.Error = strings.Join(errs, "; ")
	return s
}
