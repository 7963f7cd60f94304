package files

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const (
	testUID = 1234
	testGID = 5678
)

var testOwner = Owner{UID: testUID, GID: testGID}

func genFiles(content string) []File {
	return []File{
		{Name: "svid.pem", Data: []byte("cert " + content), Mode: CertMode},
		{Name: "svid_key.pem", Data: []byte("key " + content), Mode: KeyMode},
		{Name: "svid_bundle.pem", Data: []byte("bundle " + content), Mode: CertMode},
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("chown to another user needs root")
	}
}

// generations lists the generation directories in dir.
func generations(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var gens []string
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), "..") {
			gens = append(gens, e.Name())
		}
	}
	return gens
}

func statT(t *testing.T, p string, follow bool) (os.FileInfo, *syscall.Stat_t) {
	t.Helper()
	var fi os.FileInfo
	var err error
	if follow {
		fi, err = os.Stat(p)
	} else {
		fi, err = os.Lstat(p)
	}
	if err != nil {
		t.Fatal(err)
	}
	return fi, fi.Sys().(*syscall.Stat_t)
}

func TestWrite(t *testing.T) {
	requireRoot(t)
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)

	dir := filepath.Join(t.TempDir(), "certs")
	files := genFiles("1")
	if err := (Writer{}).Write(dir, files, testOwner); err != nil {
		t.Fatal(err)
	}

	fi, _ := statT(t, dir, false)
	if !fi.IsDir() || fi.Mode().Perm() != 0o755 {
		t.Fatalf("delivery dir mode = %v, want drwxr-xr-x", fi.Mode())
	}

	gen, err := os.Readlink(filepath.Join(dir, DataLink))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(gen, "/") || !strings.HasPrefix(gen, "..") {
		t.Fatalf("..data -> %q, want a generation name in the same directory", gen)
	}
	gfi, _ := statT(t, filepath.Join(dir, gen), false)
	if !gfi.IsDir() || gfi.Mode().Perm() != 0o755 {
		t.Fatalf("generation dir mode = %v, want drwxr-xr-x", gfi.Mode())
	}
	if gens := generations(t, dir); !slices.Equal(gens, []string{gen}) {
		t.Fatalf("generations = %q, want [%q]", gens, gen)
	}

	for _, f := range files {
		link := filepath.Join(dir, f.Name)
		target, err := os.Readlink(link)
		if err != nil {
			t.Fatalf("%s is not a symlink: %v", f.Name, err)
		}
		if want := filepath.Join(DataLink, f.Name); target != want {
			t.Fatalf("%s -> %q, want %q", f.Name, target, want)
		}
		data, err := os.ReadFile(link)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(data, f.Data) {
			t.Fatalf("%s = %q, want %q", f.Name, data, f.Data)
		}
		fi, st := statT(t, link, true)
		if !fi.Mode().IsRegular() || fi.Mode().Perm() != f.Mode {
			t.Fatalf("%s mode = %v, want %v", f.Name, fi.Mode(), f.Mode)
		}
		if st.Uid != testUID || st.Gid != testGID {
			t.Fatalf("%s owner = %d:%d, want %d:%d", f.Name, st.Uid, st.Gid, testUID, testGID)
		}
		if st.Nlink != 1 {
			t.Fatalf("%s has %d links", f.Name, st.Nlink)
		}
	}
	if fi, _ := statT(t, filepath.Join(dir, "svid_key.pem"), true); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key mode = %v, want -rw-------", fi.Mode())
	}
	if fi, _ := statT(t, filepath.Join(dir, "svid.pem"), true); fi.Mode().Perm() != 0o644 {
		t.Fatalf("cert mode = %v, want -rw-r--r--", fi.Mode())
	}

	// No temporary names are left behind.
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	want := []string{gen, DataLink, "svid.pem", "svid_bundle.pem", "svid_key.pem"}
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Fatalf("entries = %q, want %q", names, want)
	}

	got, err := Read(dir, "svid.pem", "svid_key.pem", "svid_bundle.pem")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !bytes.Equal(got[f.Name], f.Data) {
			t.Fatalf("Read()[%s] = %q, want %q", f.Name, got[f.Name], f.Data)
		}
	}
}

func TestWriteKeepsTwoGenerations(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "certs")
	var seen []string
	for i := 1; i <= 3; i++ {
		if err := (Writer{}).Write(dir, genFiles(fmt.Sprint(i)), testOwner); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		gen, err := os.Readlink(filepath.Join(dir, DataLink))
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(seen, gen) {
			t.Fatalf("write %d reused generation %q", i, gen)
		}
		seen = append(seen, gen)

		got, err := Read(dir, "svid.pem", "svid_key.pem")
		if err != nil {
			t.Fatal(err)
		}
		if string(got["svid.pem"]) != fmt.Sprintf("cert %d", i) || string(got["svid_key.pem"]) != fmt.Sprintf("key %d", i) {
			t.Fatalf("after write %d, Read() = %q", i, got)
		}
		data, err := os.ReadFile(filepath.Join(dir, "svid_bundle.pem"))
		if err != nil || string(data) != fmt.Sprintf("bundle %d", i) {
			t.Fatalf("after write %d, svid_bundle.pem = %q, %v", i, data, err)
		}
	}
	gens := generations(t, dir)
	want := []string{seen[1], seen[2]}
	slices.Sort(gens)
	slices.Sort(want)
	if !slices.Equal(gens, want) {
		t.Fatalf("after 3 writes generations = %q, want current and previous %q", gens, want)
	}
	// The previous generation is intact for readers that resolved it.
	data, err := os.ReadFile(filepath.Join(dir, seen[1], "svid_key.pem"))
	if err != nil || string(data) != "key 2" {
		t.Fatalf("previous generation key = %q, %v", data, err)
	}
}

func TestWriteErrors(t *testing.T) {
	requireRoot(t)
	// The parent of the delivery directory must exist.
	dir := filepath.Join(t.TempDir(), "missing", "certs")
	if err := (Writer{}).Write(dir, genFiles("x"), testOwner); err == nil {
		t.Fatal("Write into a missing parent: no error")
	}
	// A file name used twice fails the generation and leaves nothing behind.
	dir = filepath.Join(t.TempDir(), "certs")
	files := []File{{Name: "a", Data: []byte("1"), Mode: CertMode}, {Name: "a", Data: []byte("2"), Mode: CertMode}}
	err := (Writer{}).Write(dir, files, testOwner)
	if err == nil || !errors.Is(err, os.ErrExist) {
		t.Fatalf("duplicate name: error = %v", err)
	}
	if gens := generations(t, dir); len(gens) != 0 {
		t.Fatalf("failed write left generations %q", gens)
	}
	if _, err := os.Lstat(filepath.Join(dir, DataLink)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("failed write left ..data: %v", err)
	}
}

// TestWriteLongestName: every name the annotation parser takes is
// writable, the longest one (255 bytes, NAME_MAX) included, at the first
// write and at a rewrite; nothing the writer names for itself outgrows it.
func TestWriteLongestName(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "certs")
	name := strings.Repeat("n", 255)
	for i := range 2 {
		files := []File{{Name: name, Data: []byte(fmt.Sprint("cert ", i)), Mode: CertMode}}
		if err := (Writer{}).Write(dir, files, testOwner); err != nil {
			t.Fatalf("write %d of a 255-byte name: %v", i, err)
		}
		got, err := Read(dir, name)
		if err != nil || string(got[name]) != fmt.Sprint("cert ", i) {
			t.Fatalf("write %d: read back %q, %v", i, got[name], err)
		}
	}
}

func TestReadErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Read(dir, "svid.pem"); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Read of an empty dir: error = %v", err)
	}
	if err := (Writer{}).Write(dir, genFiles("1"), Owner{UID: os.Getuid(), GID: os.Getgid()}); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(dir, "svid.pem", "nope.pem"); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Read of a missing name: error = %v", err)
	}
}

// TestConcurrentRead rotates generations while readers read: every read
// must see cert and key of the same generation.
func TestConcurrentRead(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	owner := Owner{UID: os.Getuid(), GID: os.Getgid()}
	write := func(n int) error {
		return (Writer{}).Write(dir, []File{
			{Name: "svid.pem", Data: []byte(fmt.Sprintf("gen %d", n)), Mode: CertMode},
			{Name: "svid_key.pem", Data: []byte(fmt.Sprintf("gen %d", n)), Mode: KeyMode},
		}, owner)
	}
	if err := write(0); err != nil {
		t.Fatal(err)
	}

	var (
		stop       atomic.Bool
		reads      atomic.Int64
		mismatches atomic.Int64
		readErrs   atomic.Int64
		writes     atomic.Int64
		firstErr   atomic.Value
		wg         sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := 1; !stop.Load(); n++ {
			if err := write(n); err != nil {
				firstErr.CompareAndSwap(nil, fmt.Sprintf("write %d: %v", n, err))
				readErrs.Add(1)
				return
			}
			writes.Add(1)
		}
	}()
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				got, err := Read(dir, "svid.pem", "svid_key.pem")
				reads.Add(1)
				if err != nil {
					firstErr.CompareAndSwap(nil, err.Error())
					readErrs.Add(1)
					continue
				}
				if !bytes.Equal(got["svid.pem"], got["svid_key.pem"]) {
					firstErr.CompareAndSwap(nil, fmt.Sprintf("cert %q with key %q", got["svid.pem"], got["svid_key.pem"]))
					mismatches.Add(1)
				}
			}
		}()
	}
	time.Sleep(time.Second)
	stop.Store(true)
	wg.Wait()
	t.Logf("%d writes, %d reads", writes.Load(), reads.Load())
	if writes.Load() < 10 || reads.Load() < 10 {
		t.Fatalf("too little happened: %d writes, %d reads", writes.Load(), reads.Load())
	}
	if m, e := mismatches.Load(), readErrs.Load(); m != 0 || e != 0 {
		t.Fatalf("%d mismatches and %d errors (first: %v)", m, e, firstErr.Load())
	}
	if gens := generations(t, dir); len(gens) != 2 {
		t.Fatalf("after rotations generations = %q, want 2", gens)
	}
}

func TestLabeler(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "certs")
	l := &testhelp.LabelRecorder{}
	w := Writer{Labeler: l}
	files := genFiles("1")

	check := func(write int, labelled []string, wantDir bool, wantSymlinks []string) {
		t.Helper()
		gen, err := os.Readlink(filepath.Join(dir, DataLink))
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]bool{filepath.Join(dir, gen): true}
		if wantDir {
			want[dir] = true
		}
		for _, f := range files {
			want[filepath.Join(dir, gen, f.Name)] = true
		}
		got := map[string]bool{}
		for _, p := range labelled {
			got[p] = true
		}
		for p := range want {
			if !got[p] {
				t.Errorf("write %d: %s was not labelled (labelled: %q)", write, p, labelled)
			}
		}
		if !wantDir && got[dir] {
			t.Errorf("write %d: existing delivery dir labelled again", write)
		}
		// Symlinks are labelled under their temporary name and then renamed
		// into place, so the label travels with them.
		for _, name := range wantSymlinks {
			if !got[filepath.Join(dir, tmpName(name))] && !got[filepath.Join(dir, name)] {
				t.Errorf("write %d: symlink %s was not labelled (labelled: %q)", write, name, labelled)
			}
		}
		for _, p := range labelled {
			if p != dir && !strings.HasPrefix(p, dir+"/") {
				t.Errorf("write %d: labelled %s outside the delivery dir", write, p)
			}
		}
	}

	if err := w.Write(dir, files, testOwner); err != nil {
		t.Fatal(err)
	}
	check(1, l.Take(), true, []string{DataLink, "svid.pem", "svid_key.pem", "svid_bundle.pem"})

	// Second write: a new generation and its files, and the ..data symlink
	// that now points to it; the name symlinks already point through ..data.
	if err := w.Write(dir, files, testOwner); err != nil {
		t.Fatal(err)
	}
	check(2, l.Take(), false, []string{DataLink})

	// A labelling failure fails the write and names the path.
	l.Fail = "svid_key.pem"
	err := w.Write(dir, files, testOwner)
	if err == nil || !strings.Contains(err.Error(), "labelling") || !strings.Contains(err.Error(), "svid_key.pem") {
		t.Fatalf("labelling failure: error = %v", err)
	}
	// The failed generation was removed; the current one still serves.
	if gens := generations(t, dir); len(gens) != 2 {
		t.Fatalf("after a failed write generations = %q, want 2", gens)
	}
	if _, err := Read(dir, "svid.pem", "svid_key.pem"); err != nil {
		t.Fatalf("Read after failed write: %v", err)
	}
}
