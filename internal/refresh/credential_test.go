package refresh

import (
	"bytes"
	"encoding/pem"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// minCredentialReads is how many reads of the one-file credential the torn
// test makes at least (the bar: 0 mismatches in 100,000 reads).
const minCredentialReads = 100_000

// TestCredentialBundleNeverTorn measures the one-file layout the way
// TestReadersNeverSeeMismatch measures the two-file one: naive readers
// that open the plain name and read it once, across rapid rotations.
// Every read must give a PRIVATE KEY block first and a chain whose leaf
// that key signs for. The two-file naive reader runs beside it on the same
// delivery, so the README can put both figures side by side.
func TestCredentialBundleNeverTorn(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	p := n.workloadProcess()
	d := classic
	d.CredentialBundleFileName = "credential-bundle.pem"
	id := n.deliverDelivery(p.Process.Pid, true, d)
	n.startServing()
	dir := n.store.DeliveryDir(id, 0)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var oneReads, oneBad, twoReads, twoBad atomic.Int64
	var firstBad atomic.Value
	for range 2 {
		readUntil(&wg, stop, func() {
			data, err := os.ReadFile(filepath.Join(dir, "credential-bundle.pem"))
			oneReads.Add(1)
			if err == nil {
				err = checkCredentialBundle(data)
			}
			if err != nil {
				oneBad.Add(1)
				firstBad.CompareAndSwap(nil, err.Error())
			}
		})
	}
	readUntil(&wg, stop, func() {
		twoReads.Add(1)
		if !naiveTwoFileRead(dir) {
			twoBad.Add(1)
		}
	})

	rotations := 0
	last := n.cert(id)
	for oneReads.Load() < minCredentialReads || rotations < 200 {
		n.agent.Rotate()
		testhelp.Eventually(t, 5*time.Second, "rotation written", func() bool { return !bytes.Equal(n.cert(id), last) })
		last = n.cert(id)
		rotations++
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	pct := func(bad, reads int64) float64 { return 100 * float64(bad) / float64(max(reads, 1)) }
	t.Logf("%d rotations; one file (credential bundle): %d reads, %d mismatched (%.3f%%); two files (svid.pem + svid_key.pem): %d reads, %d mismatched (%.3f%%)",
		rotations, oneReads.Load(), oneBad.Load(), pct(oneBad.Load(), oneReads.Load()),
		twoReads.Load(), twoBad.Load(), pct(twoBad.Load(), twoReads.Load()))
	if oneBad.Load() != 0 {
		t.Errorf("naive readers of the credential bundle saw %d torn or mismatched reads; first: %v", oneBad.Load(), firstBad.Load())
	}
	if oneReads.Load() < minCredentialReads {
		t.Errorf("only %d reads of the credential bundle", oneReads.Load())
	}
}

// checkCredentialBundle is what an application written for Pod
// Certificates may assume of one read: a PRIVATE KEY block first, then
// only CERTIFICATE blocks, no headers, nothing between them, and a leaf
// the key belongs to.
func checkCredentialBundle(data []byte) error {
	rest := data
	for i := 0; len(rest) > 0; i++ {
		blk, r := pem.Decode(rest)
		if blk == nil || len(blk.Headers) != 0 || !bytes.HasPrefix(rest, pem.EncodeToMemory(blk)) {
			return errShape("not back-to-back header-less PEM blocks")
		}
		if (i == 0) != (blk.Type == "PRIVATE KEY") || (i > 0 && blk.Type != "CERTIFICATE") {
			return errShape("block " + blk.Type + " out of place")
		}
		rest = r
	}
	_, err := x509svid.Parse(data, data)
	return err
}

type errShape string

func (e errShape) Error() string { return string(e) }
