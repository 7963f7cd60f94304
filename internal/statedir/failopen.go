package statedir

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// FailOpen is the trace the hook leaves when it lets a container start
// without its identity (failure_policy: fail-open). The runtime drops a
// successful hook's output, so without it only syslog would know; the
// refresher's audit reads these to count and report such containers.
type FailOpen struct {
	ID        string    `json:"id"`
	PID       int       `json:"pid"`
	StartTime uint64    `json:"start_time"`
	Error     string    `json:"error"`
	Time      time.Time `json:"time"`
}

// FailOpenDir holds the fail-open traces (root only, on the state
// directory's tmpfs).
func (s Store) FailOpenDir() string { return filepath.Join(s.Dir, "fail-open") }

func (s Store) failOpenPath(id string) string { return filepath.Join(s.FailOpenDir(), id+".json") }

// SaveFailOpen writes f's trace. It creates no state directory: without
// one, no refresher ever ran on this node to read it (the refresher
// creates it when it starts), and the hook must not leave one on a
// persistent disk either.
func (s Store) SaveFailOpen(f FailOpen) error {
	var st unix.Statfs_t
	if err := unix.Statfs(s.Dir, &st); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("fail-open trace: %w", err)
	}
	if st.Type != unix.TMPFS_MAGIC && st.Type != unix.RAMFS_MAGIC {
		return fmt.Errorf("fail-open trace: state directory %s is not on tmpfs", s.Dir)
	}
	if err := os.MkdirAll(s.FailOpenDir(), 0o700); err != nil {
		return fmt.Errorf("fail-open trace: %w", err)
	}
	data, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("fail-open trace: %w", err)
	}
	tmp := s.failOpenPath(f.ID) + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("fail-open trace: %w", err)
	}
	if err := os.Rename(tmp, s.failOpenPath(f.ID)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("fail-open trace: %w", err)
	}
	return nil
}

// FailOpens reads every fail-open trace.
func (s Store) FailOpens() ([]FailOpen, error) {
	entries, err := os.ReadDir(s.FailOpenDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("fail-open traces: %w", err)
	}
	var out []FailOpen
	for _, e := range entries {
		id, ok := IDFromFileName(e.Name())
		if !ok {
			continue
		}
		data, err := os.ReadFile(s.failOpenPath(id))
		if err != nil {
			continue // removed meanwhile
		}
		var f FailOpen
		if json.Unmarshal(data, &f) == nil && f.ID == id {
			out = append(out, f)
		}
	}
	return out, nil
}

// RemoveFailOpen deletes container id's fail-open trace, if any.
func (s Store) RemoveFailOpen(id string) error {
	if err := os.Remove(s.failOpenPath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("fail-open trace %s: %w", id, err)
	}
	return nil
}
