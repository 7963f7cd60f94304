package statedir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
)

// A container ID names one container instance at a time, but not for
// ever: `podman restart` and `--restart=always` run a new process under
// the same ID. The hook delivering to the new instance and the refresher
// cleaning up after the old one then work on the same record and
// directory. A per-ID lock orders them: the hook holds it from its first
// file to its record, and the refresher holds it while it checks whose
// record is on disk and removes state, and while it writes files.

// LocksDir holds one lock file per container ID (root only).
func (s Store) LocksDir() string { return filepath.Join(s.Dir, "locks") }

func (s Store) lockPath(id string) string { return filepath.Join(s.LocksDir(), id+".lock") }

// Lock is a held per-container lock.
type Lock struct {
	f *os.File
}

// Unlock releases the lock.
func (l *Lock) Unlock() {
	if l != nil && l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

// Lock takes container id's lock, waiting for its holder. The lock file is
// removed with the container's state (RemoveLocked); a waiter that got a
// lock on a file removed meanwhile tries again on the new one, so two
// holders never overlap. It returns nil and no error when the state
// directory has no locks folder: nothing was ever recorded there.
func (s Store) Lock(id string) (*Lock, error) {
	if err := ocistate.ValidateID(id); err != nil {
		return nil, fmt.Errorf("record: %w", err)
	}
	p := s.lockPath(id)
	for {
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				if _, dirErr := os.Stat(s.LocksDir()); errors.Is(dirErr, fs.ErrNotExist) {
					return nil, nil
				}
			}
			return nil, fmt.Errorf("locking container %s: %w", id, err)
		}
		if err := flock(f); err != nil {
			f.Close()
			return nil, fmt.Errorf("locking container %s: %w", id, err)
		}
		var held, now unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) == nil && unix.Stat(p, &now) == nil && held.Ino == now.Ino && held.Dev == now.Dev {
			return &Lock{f: f}, nil
		}
		f.Close() // removed while we waited: lock the new one
	}
}

func flock(f *os.File) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// RemoveLocked deletes container id's record, files and lock file; the
// caller holds the lock, which stays held until it unlocks.
func (s Store) RemoveLocked(id string) error {
	if err := s.remove(id); err != nil {
		return err
	}
	if err := os.Remove(s.lockPath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("record %s: %w", id, err)
	}
	return nil
}

// RemoveInstance deletes container id's state if its record, when there
// is one, still names the instance (pid, start time) that exited. A
// record naming another instance belongs to a new container under the
// same ID, whose files must stay. It reports whether it removed.
func (s Store) RemoveInstance(id string, pid int, startTime uint64) (bool, error) {
	l, err := s.Lock(id)
	if err != nil {
		return false, err
	}
	defer l.Unlock()
	rec, err := s.Load(id)
	if err == nil && (rec.PID != pid || rec.StartTime != startTime) {
		return false, nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	return true, s.RemoveLocked(id)
}

// RemoveOrphan deletes the files of container id if it still has no
// record once the lock is held (a hook may be delivering to it now). It
// reports whether there were files to delete. A fail-open trace stays:
// the container may be running without its identity, which the audit
// reports until its process is gone.
func (s Store) RemoveOrphan(id string) (bool, error) {
	l, err := s.Lock(id)
	if err != nil {
		return false, err
	}
	defer l.Unlock()
	if _, err := os.Lstat(s.RecordPath(id)); !errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	dir := s.ContainerDir(id)
	_, err = os.Lstat(dir)
	existed := err == nil
	if err := os.RemoveAll(dir); err != nil {
		return existed, fmt.Errorf("record %s: %w", id, err)
	}
	if err := os.Remove(s.lockPath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return existed, fmt.Errorf("record %s: %w", id, err)
	}
	return existed, nil
}
