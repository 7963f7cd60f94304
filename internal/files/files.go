// Package files is the one writer of identity files in this project, used by
// the hook for the first delivery and by the refresher for every rotation.
//
// A delivery directory holds whole generations. Each write creates a new
// generation directory, fills it, and then swaps the "..data" symlink to it
// with one rename, the way Kubernetes' AtomicWriter does for projected
// volumes. The user-visible names are symlinks through "..data", so cert,
// key and bundle always change together:
//
//	svid.pem        -> ..data/svid.pem
//	svid_key.pem    -> ..data/svid_key.pem
//	svid_bundle.pem -> ..data/svid_bundle.pem
//	..data          -> ..2026_11_25_10_00_00.123456789
//	..2026_11_25_10_00_00.123456789/   (current generation)
//	..2026_11_25_09_59_30.987654321/   (previous, kept for readers mid-read)
//
// A reader that must never pair a new cert with an old key resolves
// "..data" once and reads every file from that generation (see Read).
package files

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// DataLink is the symlink that names the current generation.
const DataLink = "..data"

const genPrefix = ".."

// File is one file of a generation.
type File struct {
	Name string
	Data []byte
	Mode os.FileMode
}

// Modes of the identity files: only the owner reads the key.
const (
	KeyMode  = 0o600
	CertMode = 0o644
)

// Owner is who owns the files (as seen from the host).
type Owner struct {
	UID int `json:"uid"`
	GID int `json:"gid"`
}

// Labeler applies a security label (SELinux) to a path the writer created.
type Labeler interface {
	Label(path string) error
}

// Writer writes generations.
type Writer struct {
	// Labeler, when not nil, labels the delivery directory, each
	// generation directory, each file and each symlink the writer makes.
	Labeler Labeler
}

// Write makes files the current generation in dir, creating dir when
// missing. It keeps the previous generation and removes older ones.
//
// Every step works from a handle of dir or of the new generation (openat,
// symlinkat, renameat, fchmod, O_NOFOLLOW), never from a path resolved
// again: were a name inside dir swapped for a symlink or a FIFO, the
// writer would not follow it out of dir or block on it.
func (w Writer) Write(dir string, files []File, owner Owner) error {
	d, err := w.openDir(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	dfd := int(d.Fd())
	prev, _ := readlinkat(dfd, DataLink)

	gen, err := w.newGeneration(dfd, dir, files, owner)
	if err != nil {
		return err
	}
	if err := w.swap(dfd, dir, DataLink, gen); err != nil {
		os.RemoveAll(filepath.Join(dir, gen))
		return err
	}
	for _, f := range files {
		want := filepath.Join(DataLink, f.Name)
		if cur, err := readlinkat(dfd, f.Name); err == nil && cur == want {
			continue
		}
		if err := w.swap(dfd, dir, f.Name, want); err != nil {
			return err
		}
	}
	// One listing serves both clean-ups: a refresher rewrites a thousand
	// directories at once, each read is a syscall round and its garbage.
	entries, err := d.ReadDir(-1)
	if err != nil {
		return fmt.Errorf("files: %w", err)
	}
	if err := unlinkGone(dfd, dir, entries, files); err != nil {
		return err
	}
	return prune(dir, entries, gen, prev)
}

// unlinkGone removes the plain-name links of files the new generation no
// longer has (a trust domain no longer federated with). The generation
// swap already removed their content for a reader that resolves "..data";
// this takes away the dangling name.
func unlinkGone(dfd int, dir string, entries []fs.DirEntry, files []File) error {
	keep := make(map[string]bool, len(files))
	for _, f := range files {
		keep[f.Name] = true
	}
	for _, e := range entries {
		name := e.Name()
		if e.Type()&fs.ModeSymlink == 0 || strings.HasPrefix(name, genPrefix) || keep[name] {
			continue
		}
		if target, err := readlinkat(dfd, name); err != nil || target != filepath.Join(DataLink, name) {
			continue
		}
		if err := unix.Unlinkat(dfd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("files: removing %s: %w", filepath.Join(dir, name), err)
		}
	}
	return nil
}

// openDir opens dir, creating it when missing, and never through a
// symlink at its last component.
func (w Writer) openDir(dir string) (*os.File, error) {
	err := unix.Mkdir(dir, 0o755)
	created := err == nil
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("files: creating %s: %w", dir, err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("files: opening %s: %w", dir, err)
	}
	d := os.NewFile(uintptr(fd), dir)
	if created {
		// Mkdir honours the umask; the mode must not depend on it.
		if err := unix.Fchmod(fd, 0o755); err != nil {
			d.Close()
			return nil, fmt.Errorf("files: %w", err)
		}
		if err := w.label(dir); err != nil {
			d.Close()
			return nil, err
		}
	}
	return d, nil
}

// newGeneration makes a generation directory in dfd (dir) holding files,
// and returns its name.
func (w Writer) newGeneration(dfd int, dir string, files []File, owner Owner) (string, error) {
	stamp := genPrefix + time.Now().UTC().Format("2006_01_02_15_04_05.000000000") + "."
	var gen string
	for try := 0; ; try++ {
		gen = stamp + strconv.FormatUint(uint64(rand.Uint32()), 10)
		err := unix.Mkdirat(dfd, gen, 0o700)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EEXIST) || try == 100 {
			return "", fmt.Errorf("files: creating generation in %s: %w", dir, err)
		}
	}
	path := filepath.Join(dir, gen)
	gfd, err := unix.Openat(dfd, gen, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		os.RemoveAll(path)
		return "", fmt.Errorf("files: opening %s: %w", path, err)
	}
	defer unix.Close(gfd)
	if err := unix.Fchmod(gfd, 0o755); err != nil {
		os.RemoveAll(path)
		return "", fmt.Errorf("files: %w", err)
	}
	if err := w.label(path); err != nil {
		os.RemoveAll(path)
		return "", err
	}
	for _, f := range files {
		if err := w.writeFile(gfd, path, f, owner); err != nil {
			os.RemoveAll(path)
			return "", err
		}
	}
	return gen, nil
}

// writeFile writes f in the generation gfd (gen, its path, names it in
// messages and for the labeler).
func (w Writer) writeFile(gfd int, gen string, f File, owner Owner) (err error) {
	path := filepath.Join(gen, f.Name)
	// O_EXCL|O_NOFOLLOW: the generation is new and ours alone; nothing may
	// already stand at the name (with O_CREAT|O_EXCL a FIFO there is an
	// error, never opened).
	fd, err := unix.Openat(gfd, f.Name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("files: creating %s: %w", path, err)
	}
	file := os.NewFile(uintptr(fd), path)
	defer func() {
		if cerr := file.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("files: %w", cerr)
		}
	}()
	// Owner and mode are set before any secret byte is written.
	if err := file.Chown(owner.UID, owner.GID); err != nil {
		return fmt.Errorf("files: chown %s to %d:%d: %w", path, owner.UID, owner.GID, err)
	}
	if err := file.Chmod(f.Mode); err != nil {
		return fmt.Errorf("files: %w", err)
	}
	if _, err := file.Write(f.Data); err != nil {
		return fmt.Errorf("files: writing %s: %w", path, err)
	}
	return w.label(path)
}

// tmpName is the temporary name under which swap makes the link for name:
// of fixed length, so that every name of up to NAME_MAX bytes can be
// swapped in, and starting with "..", which no chosen file name may.
func tmpName(name string) string {
	sum := sha256.Sum256([]byte(name))
	return genPrefix + "tmp." + hex.EncodeToString(sum[:8])
}

// swap points name in dfd (dir) at target with a rename, so the name is
// never missing.
func (w Writer) swap(dfd int, dir, name, target string) error {
	tmp := tmpName(name)
	unix.Unlinkat(dfd, tmp, 0)
	if err := unix.Symlinkat(target, dfd, tmp); err != nil {
		return fmt.Errorf("files: linking %s: %w", filepath.Join(dir, name), err)
	}
	if err := w.label(filepath.Join(dir, tmp)); err != nil {
		unix.Unlinkat(dfd, tmp, 0)
		return err
	}
	if err := unix.Renameat(dfd, tmp, dfd, name); err != nil {
		unix.Unlinkat(dfd, tmp, 0)
		return fmt.Errorf("files: renaming to %s: %w", filepath.Join(dir, name), err)
	}
	return nil
}

// readlinkat reads the symlink name in dfd.
func readlinkat(dfd int, name string) (string, error) {
	buf := make([]byte, 256)
	for {
		n, err := unix.Readlinkat(dfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < len(buf) {
			return string(buf[:n]), nil
		}
		buf = make([]byte, 2*len(buf))
	}
}

func (w Writer) label(path string) error {
	if w.Labeler == nil {
		return nil
	}
	if err := w.Labeler.Label(path); err != nil {
		return fmt.Errorf("files: labelling %s: %w", path, err)
	}
	return nil
}

// prune removes every generation among entries (dir's listing) but cur
// and prev. The previous one stays so that a reader that resolved "..data"
// just before the swap can finish.
func prune(dir string, entries []fs.DirEntry, cur, prev string) error {
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, genPrefix) || name == cur || name == prev {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("files: %w", err)
		}
	}
	return nil
}

// List returns the names of the files in dir's current generation.
func List(dir string) ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(dir, DataLink))
	if err != nil {
		return nil, fmt.Errorf("files: %w", err)
	}
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	return names, nil
}

// Read reads names from one generation of dir: it resolves "..data" once,
// so the files it returns were written together. This is the safe way to
// read a delivery; the README shows the same steps for other languages.
func Read(dir string, names ...string) (map[string][]byte, error) {
	// A generation two rotations old is pruned; if that happens between
	// resolving and reading, resolve again. A missing file is an error only
	// when "..data" still names the same generation: a reader fails only if
	// rotations keep outrunning it (the bound), never on a busy writer.
	prev := ""
	var lastErr error
	for range 100 {
		gen, err := os.Readlink(filepath.Join(dir, DataLink))
		if err != nil {
			return nil, fmt.Errorf("files: %w", err)
		}
		if gen == prev {
			break
		}
		prev = gen
		out := make(map[string][]byte, len(names))
		for _, n := range names {
			b, err := os.ReadFile(filepath.Join(dir, gen, n))
			if err != nil {
				lastErr = err
				out = nil
				break
			}
			out[n] = b
		}
		if out != nil {
			return out, nil
		}
	}
	return nil, fmt.Errorf("files: %w", lastErr)
}
