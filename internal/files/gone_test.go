package files

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestWriteDropsGoneFiles: a file the new generation no longer has (a
// trust domain no longer federated with) disappears from the generation
// and from the plain names; the others stay; a file the writer did not
// link is left alone.
func TestWriteDropsGoneFiles(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "d")
	withPartner := append(genFiles("1"), File{Name: "partner.test.trust-bundle.pem", Data: []byte("partner"), Mode: CertMode})
	if err := (Writer{}).Write(dir, withPartner, testOwner); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/elsewhere", filepath.Join(dir, "not-ours")); err != nil {
		t.Fatal(err)
	}
	if names, err := List(dir); err != nil || len(names) != 4 {
		t.Fatalf("List = %v, %v", names, err)
	}
	if err := (Writer{}).Write(dir, genFiles("2"), testOwner); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "partner.test.trust-bundle.pem")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the gone file's name is still there: %v", err)
	}
	names, err := List(dir)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(names)
	if want := []string{"svid.pem", "svid_bundle.pem", "svid_key.pem"}; !slices.Equal(names, want) {
		t.Fatalf("current generation holds %v, want %v", names, want)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "svid.pem")); err != nil || string(b) != "cert 2" {
		t.Fatalf("svid.pem = %q, %v", b, err)
	}
	if l, err := os.Readlink(filepath.Join(dir, "not-ours")); err != nil || l != "/elsewhere" {
		t.Fatalf("a link the writer did not make was touched: %q, %v", l, err)
	}
	// It comes back when the trust domain does.
	if err := (Writer{}).Write(dir, withPartner, testOwner); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "partner.test.trust-bundle.pem")); err != nil || string(b) != "partner" {
		t.Fatalf("partner bundle after re-federation = %q, %v", b, err)
	}
}
