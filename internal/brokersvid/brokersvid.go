// Package brokersvid keeps the node's broker identity: the X.509-SVID
// with which the hook and the refresher authenticate to the agent's SPIFFE
// Broker API (agent_api: broker).
//
// The refresher fetches it from the agent's Workload API (it is the
// refresher's own identity: the agent attests the refresher's process) and
// keeps it fresh, in memory (Holder) and as files in the root-only state
// directory (Write). The hook reads those files (Load): one local read, so
// its path to a container's identity adds no call to the agent. A missing
// or expired file is one clear error, never a container without identity.
package brokersvid

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

// File names inside the broker directory.
const (
	SVIDFile   = "svid.pem"
	KeyFile    = "svid_key.pem"
	BundleFile = "bundle.pem"
)

// Dir is the broker directory of a state directory. The state directory
// is root's only (0700) and on tmpfs, so the key stays off disk.
func Dir(stateDir string) string { return filepath.Join(stateDir, "broker") }

// Identity is a broker SVID and its trust domain's bundle, which verifies
// the agent's serving certificate. It is an agent.BrokerIdentity.
type Identity struct {
	SVID   *x509svid.SVID
	Bundle *x509bundle.Bundle
}

// GetX509SVID implements x509svid.Source.
func (i *Identity) GetX509SVID() (*x509svid.SVID, error) { return i.SVID, nil }

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (i *Identity) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return i.Bundle.GetX509BundleForTrustDomain(td)
}

// ErrMissing: no broker SVID has been written (the refresher is not
// running with agent_api: broker, or has not got one yet).
var ErrMissing = errors.New("no broker SVID")

// Write makes id the current broker SVID in dir, through the one atomic
// writer: certificate, key and bundle change together.
func Write(w files.Writer, dir string, id *Identity) error {
	certs, key, err := id.SVID.Marshal()
	if err != nil {
		return fmt.Errorf("broker SVID %s: %w", id.SVID.ID, err)
	}
	bundle, err := id.Bundle.Marshal()
	if err != nil {
		return fmt.Errorf("broker SVID bundle of %s: %w", id.Bundle.TrustDomain(), err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("broker SVID: %w", err)
	}
	return w.Write(dir, []files.File{
		{Name: SVIDFile, Data: certs, Mode: files.CertMode},
		{Name: KeyFile, Data: key, Mode: files.KeyMode},
		{Name: BundleFile, Data: bundle, Mode: files.CertMode},
	}, files.Owner{UID: os.Getuid(), GID: os.Getgid()})
}

// Load reads the broker SVID from dir and checks that it is valid at now.
func Load(dir string, now time.Time) (*Identity, error) {
	data, err := files.Read(dir, SVIDFile, KeyFile, BundleFile)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w in %s: spiffe-oci-refresher writes it from the agent's Workload API (workload_api_socket) when agent_api is broker; is it running, and does an entry match it?", ErrMissing, dir)
		}
		return nil, fmt.Errorf("broker SVID in %s: %w", dir, err)
	}
	svid, err := x509svid.Parse(data[SVIDFile], data[KeyFile])
	if err != nil {
		return nil, fmt.Errorf("broker SVID in %s: %w", dir, err)
	}
	if leaf := svid.Certificates[0]; now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
		return nil, fmt.Errorf("broker SVID %s in %s expired at %s: spiffe-oci-refresher renews it from the agent's Workload API; is it running? (%w)",
			svid.ID, dir, leaf.NotAfter.UTC().Format(time.RFC3339), ErrMissing)
	}
	bundle, err := x509bundle.Parse(svid.ID.TrustDomain(), data[BundleFile])
	if err != nil {
		return nil, fmt.Errorf("broker SVID bundle in %s: %w", dir, err)
	}
	return &Identity{SVID: svid, Bundle: bundle}, nil
}

// Holder is the refresher's current broker SVID, replaced on every
// Workload API update. It is an agent.BrokerIdentity; before the first
// update it has none, and a TLS handshake fails (the streams retry).
type Holder struct {
	mu     sync.RWMutex
	cur    *Identity
	once   sync.Once // makes ready
	closed sync.Once // closes it, at the first Set
	ready  chan struct{}
}

// Set replaces the current identity.
func (h *Holder) Set(id *Identity) {
	h.mu.Lock()
	h.cur = id
	h.mu.Unlock()
	h.closed.Do(func() { close(h.readyCh()) })
}

// Ready returns a channel closed once the holder has an identity.
func (h *Holder) Ready() <-chan struct{} { return h.readyCh() }

func (h *Holder) readyCh() chan struct{} {
	h.once.Do(func() { h.ready = make(chan struct{}) })
	return h.ready
}

// Get returns the current identity, nil before the first.
func (h *Holder) Get() *Identity {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.cur
}

// GetX509SVID implements x509svid.Source.
func (h *Holder) GetX509SVID() (*x509svid.SVID, error) {
	if cur := h.Get(); cur != nil {
		return cur.SVID, nil
	}
	return nil, fmt.Errorf("%w yet from the agent's Workload API", ErrMissing)
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (h *Holder) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if cur := h.Get(); cur != nil {
		return cur.GetX509BundleForTrustDomain(td)
	}
	return nil, fmt.Errorf("%w yet from the agent's Workload API", ErrMissing)
}
