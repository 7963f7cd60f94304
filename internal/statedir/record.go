// Package statedir is the state directory (on tmpfs) and all the hook
// and the refresher keep in it: each served container's record, for the
// refresher to pick up; the per-container locks; the state budget; the
// refresher's heartbeat; and the fail-open traces.
//
// Layout under the state directory:
//
//	records/<container-id>.json        the records (this file), root only
//	containers/<container-id>/<n>/     delivery n's files (see package files)
//	containers/<container-id>/.footprint  its reserved share of the state budget (budget.go)
//	locks/<container-id>.lock          the container's lock (lock.go)
//	fail-open/<container-id>.json      a fail-open start's trace (failopen.go)
//	refresher.alive                    the refresher's heartbeat (heartbeat.go)
//	handoff.sock                       the refresher's handoff socket (package handoff), root only
//
// A record is written last, by rename, after the files are in place and
// mounted; its appearance is the refresher's signal that the container is
// ready to be kept fresh.
package statedir

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
)

// Record is what the hook knew when it delivered.
type Record struct {
	ID string `json:"id"`
	// PID and StartTime name the container's process across restarts.
	PID       int    `json:"pid"`
	StartTime uint64 `json:"start_time"`
	// Owner of the files on the host.
	Owner files.Owner `json:"owner"`
	// AgentSocket is the admin socket the identity came from.
	AgentSocket string `json:"agent_socket"`
	// MountLabel is the container's SELinux mount label, if any.
	MountLabel string `json:"mount_label,omitempty"`
	// Deliveries, in annotation order; delivery n lives in DeliveryDir(n).
	Deliveries []Delivery `json:"deliveries"`
	Created    time.Time  `json:"created"`
}

// Delivery is one delivery and the SPIFFE ID last written to it.
type Delivery struct {
	annotations.Delivery
	Delivered string `json:"delivered_spiffe_id"`
}

// Store is a state directory.
type Store struct {
	Dir string
}

// RecordsDir is the directory the refresher watches.
func (s Store) RecordsDir() string { return filepath.Join(s.Dir, "records") }

// RecordPath is where container id's record lives.
func (s Store) RecordPath(id string) string { return filepath.Join(s.RecordsDir(), id+".json") }

// ContainerDir holds all of container id's deliveries.
func (s Store) ContainerDir(id string) string { return filepath.Join(s.Dir, "containers", id) }

// HandoffSocket is where the refresher takes containers over from the hook
// (package handoff).
func (s Store) HandoffSocket() string { return filepath.Join(s.Dir, "handoff.sock") }

// DeliveryDir is the directory of delivery n of container id.
func (s Store) DeliveryDir(id string, n int) string {
	return filepath.Join(s.ContainerDir(id), strconv.Itoa(n))
}

// Init creates the state directory's folders, readable by root only except
// the delivery directories, which are bind-mounted into containers anyway.
// It refuses a state directory that is not on tmpfs: keys never touch
// persistent disk.
func (s Store) Init() error {
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.Dir, &st); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if st.Type != unix.TMPFS_MAGIC && st.Type != unix.RAMFS_MAGIC {
		return fmt.Errorf("state directory %s is not on tmpfs: keys must never reach persistent disk; set state_dir to a path under /run", s.Dir)
	}
	for _, d := range []string{s.RecordsDir(), filepath.Join(s.Dir, "containers"), s.LocksDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("state directory: %w", err)
		}
	}
	return nil
}

// Save writes r atomically.
func (s Store) Save(r Record) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("record %s: %w", r.ID, err)
	}
	tmp, err := os.CreateTemp(s.RecordsDir(), ".tmp."+r.ID+".")
	if err != nil {
		return fmt.Errorf("record %s: %w", r.ID, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("record %s: %w", r.ID, err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("record %s: %w", r.ID, err)
	}
	if err := os.Rename(tmp.Name(), s.RecordPath(r.ID)); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("record %s: %w", r.ID, err)
	}
	return nil
}

// Load reads container id's record.
func (s Store) Load(id string) (Record, error) {
	if err := ocistate.ValidateID(id); err != nil {
		return Record{}, fmt.Errorf("record: %w", err)
	}
	data, err := os.ReadFile(s.RecordPath(id))
	if err != nil {
		return Record{}, fmt.Errorf("record %s: %w", id, err)
	}
	var r Record
	if err := json.Unmarshal(data, &r); err != nil {
		return Record{}, fmt.Errorf("record %s: %w", id, err)
	}
	if r.ID != id {
		return Record{}, fmt.Errorf("record %s: names container %q", id, r.ID)
	}
	return r, nil
}

// IDs lists the containers that have a record.
func (s Store) IDs() ([]string, error) {
	entries, err := readStateDir(s.RecordsDir())
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range entries {
		if id, ok := IDFromFileName(e.Name()); ok {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// readStateDir lists dir, a directory of the state directory that may not
// have been made yet: then it is empty.
func readStateDir(dir string) ([]os.DirEntry, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	return entries, nil
}

// IDFromFileName returns the container ID a file in RecordsDir belongs to.
func IDFromFileName(name string) (string, bool) {
	id, ok := strings.CutSuffix(name, ".json")
	if !ok || ocistate.ValidateID(id) != nil {
		return "", false
	}
	return id, true
}

// Orphans lists container directories that have no record: left behind by
// a hook that was killed mid-way, or by a container whose poststop never ran.
func (s Store) Orphans() ([]string, error) {
	entries, err := readStateDir(filepath.Join(s.Dir, "containers"))
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range entries {
		if _, err := os.Lstat(s.RecordPath(e.Name())); errors.Is(err, fs.ErrNotExist) {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// Remove deletes container id's record first (so the refresher stops
// caring) and then its files, under the container's lock.
func (s Store) Remove(id string) error {
	if err := ocistate.ValidateID(id); err != nil {
		return fmt.Errorf("record: %w", err)
	}
	l, err := s.Lock(id)
	if err != nil {
		return err
	}
	defer l.Unlock()
	return s.RemoveLocked(id)
}

func (s Store) remove(id string) error {
	if err := ocistate.ValidateID(id); err != nil {
		return fmt.Errorf("record: %w", err)
	}
	if err := os.Remove(s.RecordPath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("record %s: %w", id, err)
	}
	if err := os.RemoveAll(s.ContainerDir(id)); err != nil {
		return fmt.Errorf("record %s: %w", id, err)
	}
	return s.RemoveFailOpen(id)
}
