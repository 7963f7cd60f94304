package record

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Every file the hook and the refresher write is tmpfs pages, charged to
// the memory of whoever wrote them: to the refresher's cgroup from its
// first rewrite on. A pod chooses how many deliveries it asks for (up to
// 16, of 4 to 6 files and JWTs each, two generations kept), so the node
// sets a budget on what the state directory holds, which the hook
// enforces before it writes (see hook.Create).

// budgetLock is the node-wide lock under which a hook checks the budget
// and writes its files, so that two hooks never both take the last room.
// Container IDs never begin with a dot (ocistate.ValidateID).
func (s Store) budgetLock() string { return filepath.Join(s.LocksDir(), ".budget") }

// LockBudget takes the node-wide budget lock, waiting for its holder.
func (s Store) LockBudget() (*Lock, error) {
	f, err := os.OpenFile(s.budgetLock(), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state budget lock: %w", err)
	}
	if err := flock(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("state budget lock: %w", err)
	}
	return &Lock{f: f}, nil
}

// Used returns how many bytes the state directory's filesystem holds.
func (s Store) Used() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.Dir, &st); err != nil {
		return 0, fmt.Errorf("state directory: %w", err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize, nil
}

// PageSize is the unit tmpfs holds a file in.
var PageSize = int64(os.Getpagesize())

// Footprint is what files of these sizes hold on tmpfs, in the two
// generations the writer keeps: each file takes whole pages, at least one.
func Footprint(sizes []int) int64 {
	var n int64
	for _, s := range sizes {
		n += max(1, (int64(s)+PageSize-1)/PageSize) * PageSize
	}
	return 2 * n
}
