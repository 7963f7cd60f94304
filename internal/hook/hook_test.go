package hook

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/deliver"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/refresh"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const mountLabel = "system_u:object_r:container_file_t:s0:c12,c34"

// tmpLink is the name under which the writer makes the link for name
// before renaming it into place: "..tmp." and 16 hex digits of the name's
// SHA-256 (files' tmpName), of fixed length for names of up to 255 bytes.
func tmpLink(name string) string {
	sum := sha256.Sum256([]byte(name))
	return "..tmp." + hex.EncodeToString(sum[:8])
}

// TestMountLabelSeam: with linux.mountLabel in config.json, the labeler
// receives exactly the delivery directory and every file and symlink
// written, at first delivery (hook) and after a rotation (refresher). This
// machine's kernel has no SELinux, so the seam is what can be tested here;
// internal/selinux applies the label with go-selinux on a real node.
func TestMountLabelSeam(t *testing.T) {
	dir, state, fake, cfg := agentNode(t, 16)
	fake.Default = []spiffeid.ID{spiffeid.RequireFromString("spiffe://example.org/labelled")}

	bundle := writeBundle(dir, specs.Spec{
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{User: specs.User{UID: 1000, GID: 1000}},
		Linux:   &specs.Linux{MountLabel: mountLabel},
	})

	// A process in a mount namespace of its own stands in for "runc init".
	pid := testhelp.StandIn(t)

	rec := &testhelp.LabelRecorder{}
	labelerFor := func(l string) files.Labeler {
		if l != mountLabel {
			t.Errorf("labeler asked for %q, want %q", l, mountLabel)
		}
		return rec
	}
	h := directHook(cfg, func(d *deliver.Deliverer) { d.Labeler = labelerFor })
	req, err := Find(&specs.State{ID: "labelled", Pid: pid, Bundle: bundle, Annotations: map[string]string{annotations.Key: "- cert_dir: /certs\n"}})
	if err != nil || req == nil {
		t.Fatalf("Find: %v %v", req, err)
	}
	if err := h.Create(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	delivery := statedir.Store{Dir: state}.DeliveryDir("labelled", 0)
	gen1, _ := os.Readlink(filepath.Join(delivery, files.DataLink))
	const ownTD = "example.org.trust-bundle.pem"
	want := []string{"", gen1, gen1 + "/svid.pem", gen1 + "/svid_key.pem", gen1 + "/svid_bundle.pem", gen1 + "/" + ownTD,
		tmpLink(files.DataLink), tmpLink("svid.pem"), tmpLink("svid_key.pem"), tmpLink("svid_bundle.pem"), tmpLink(ownTD)}
	checkLabelled(t, "first delivery", rec.Take(), delivery, want)
	// Every entry in the directory now carries the label: the tmp
	// symlinks were labelled before being renamed to these names.
	for _, e := range mustReadDir(t, delivery) {
		if !slices.Contains(want, e) && !slices.Contains(want, tmpLink(e)) {
			t.Errorf("%s was written but never labelled", e)
		}
	}

	// A rotation by the refresher labels the new generation and ..data.
	startRefresher(t, cfg, func(r *refresh.Refresher) { r.Labeler = labelerFor })
	// The fake agent mints a new SVID for every new stream, so the
	// refresher's first update is itself a rotation; wait for it. Every
	// label of a write is given before its "..data" moves.
	genA := waitDataMoved(t, delivery, gen1)
	rec.Take()
	fake.Rotate()
	gen2 := waitDataMoved(t, delivery, genA)
	time.Sleep(100 * time.Millisecond) // the bundle update may follow; it must not relabel anything unchanged
	checkLabelled(t, "rotation", rec.Take(), delivery, []string{gen2, gen2 + "/svid.pem", gen2 + "/svid_key.pem", gen2 + "/svid_bundle.pem", gen2 + "/" + ownTD, tmpLink(files.DataLink)})
}

// waitDataMoved waits until the "..data" link of delivery dir names
// another generation than from, and returns the one it names.
func waitDataMoved(t *testing.T, dir, from string) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if gen, err := os.Readlink(filepath.Join(dir, files.DataLink)); err == nil && gen != from {
			return gen
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no rotation written after 5s", dir)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// startRefresher runs a refresher on cfg's node, configured by configure
// (when not nil), until t ends.
func startRefresher(t *testing.T, cfg config.Config, configure func(*refresh.Refresher)) {
	t.Helper()
	r := refresh.New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if configure != nil {
		configure(r)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() { done <- r.Run(ctx, func() { close(ready) }) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("refresher: %v", err)
	}
}

func checkLabelled(t *testing.T, when string, got []string, dir string, want []string) {
	t.Helper()
	rel := make([]string, len(got))
	for i, p := range got {
		r, err := filepath.Rel(dir, p)
		if err != nil || strings.HasPrefix(r, "..") && !strings.HasPrefix(r, "..tmp") && !strings.HasPrefix(r, "..2") {
			t.Errorf("%s: labelled %s, outside the delivery directory", when, p)
		}
		if r == "." {
			r = ""
		}
		rel[i] = r
	}
	sort.Strings(rel)
	w := slices.Clone(want)
	sort.Strings(w)
	if !slices.Equal(rel, w) {
		t.Errorf("%s: labelled %q, want exactly %q", when, rel, w)
	}
}

func mustReadDir(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}
