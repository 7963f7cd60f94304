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
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
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
func (w Writer) Write(dir string, files []File, owner Owner) error {
	if err := w.ensureDir(dir); err != nil {
		return err
	}
	prev, _ := os.Readlink(filepath.Join(dir, DataLink))

	gen, err := w.newGeneration(dir, files, owner)
	if err != nil {
		return err
	}
	if err := w.swap(dir, DataLink, gen); err != nil {
		os.RemoveAll(filepath.Join(dir, gen))
		return err
	}
	for _, f := range files {
		link := filepath.Join(dir, f.Name)
		want := filepath.Join(DataLink, f.Name)
		if cur, err := os.Readlink(link); err == nil && cur == want {
			continue
		}
		if err := w.swap(dir, f.Name, want); err != nil {
			return err
		}
	}
	// One listing serves both clean-ups: a refresher rewrites a thousand
	// directories at once, each read is a syscall round and its garbage.
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("files: %w", err)
	}
	if err := unlinkGone(dir, entries, files); err != nil {
		return err
	}
	return prune(dir, entries, gen, prev)
}

// unlinkGone removes the plain-name links of files the new generation no
// longer has (a trust domain no longer federated with). The generation
// swap already removed their content for a reader that resolves "..data";
// this takes away the dangling name.
func unlinkGone(dir string, entries []fs.DirEntry, files []File) error {
	keep := make(map[string]bool, len(files))
	for _, f := range files {
		keep[f.Name] = true
	}
	for _, e := range entries {
		name := e.Name()
		if e.Type()&fs.ModeSymlink == 0 || strings.HasPrefix(name, genPrefix) || keep[name] {
			continue
		}
		if target, err := os.Readlink(filepath.Join(dir, name)); err != nil || target != filepath.Join(DataLink, name) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("files: %w", err)
		}
	}
	return nil
}

func (w Writer) ensureDir(dir string) error {
	err := os.Mkdir(dir, 0o755)
	switch {
	case err == nil:
		// Mkdir honours the umask; the mode must not depend on it.
		if err := os.Chmod(dir, 0o755); err != nil {
			return fmt.Errorf("files: %w", err)
		}
		return w.label(dir)
	case errors.Is(err, fs.ErrExist):
		return nil
	default:
		return fmt.Errorf("files: %w", err)
	}
}

func (w Writer) newGeneration(dir string, files []File, owner Owner) (string, error) {
	gen, err := os.MkdirTemp(dir, genPrefix+time.Now().UTC().Format("2006_01_02_15_04_05.000000000")+".")
	if err != nil {
		return "", fmt.Errorf("files: creating generation in %s: %w", dir, err)
	}
	if err := os.Chmod(gen, 0o755); err != nil {
		os.RemoveAll(gen)
		return "", fmt.Errorf("files: %w", err)
	}
	if err := w.label(gen); err != nil {
		os.RemoveAll(gen)
		return "", err
	}
	for _, f := range files {
		if err := w.writeFile(filepath.Join(gen, f.Name), f, owner); err != nil {
			os.RemoveAll(gen)
			return "", err
		}
	}
	return filepath.Base(gen), nil
}

func (w Writer) writeFile(path string, f File, owner Owner) (err error) {
	// O_EXCL|O_NOFOLLOW: the generation is new and ours alone; nothing may
	// already stand at the name.
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
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

// swap points dir/name at target with a rename, so the name is never missing.
func (w Writer) swap(dir, name, target string) error {
	tmp := filepath.Join(dir, genPrefix+"tmp."+name)
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("files: %w", err)
	}
	if err := w.label(tmp); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("files: %w", err)
	}
	return nil
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
