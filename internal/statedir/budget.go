package statedir

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

// LockBudget takes the node-wide lock under which a hook checks the
// budget and writes its files, so that two hooks never both take the last
// room, waiting for its holder. It is a flock on the containers folder
// itself: no file of its own is left in the state directory.
func (s Store) LockBudget() (*Lock, error) {
	f, err := os.Open(filepath.Join(s.Dir, "containers"))
	if err != nil {
		return nil, fmt.Errorf("state budget lock: %w", err)
	}
	if err := flock(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("state budget lock: %w", err)
	}
	return &Lock{f: f}, nil
}

// Used returns how many bytes the state directory's filesystem holds
// when that filesystem is the state directory's own (a tmpfs mounted on
// it, as the cluster harness and the tests do). On a filesystem it shares
// (systemd's /run, which the tmpfiles.d entry and the DaemonSet's hostPath
// use) the usage counts everything else there, a volatile journal in
// /run/log/journal say, which is not the containers' to pay for: then 0,
// and the containers' reservations alone count.
func (s Store) Used() (int64, error) {
	var dir, parent unix.Stat_t
	if err := unix.Stat(s.Dir, &dir); err != nil {
		return 0, fmt.Errorf("state directory: %w", err)
	}
	if err := unix.Stat(filepath.Dir(s.Dir), &parent); err != nil {
		return 0, fmt.Errorf("state directory: %w", err)
	}
	if dir.Dev == parent.Dev {
		return 0, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.Dir, &st); err != nil {
		return 0, fmt.Errorf("state directory: %w", err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize, nil
}

// footprintFile, in a container's directory (never mounted into the
// container), is as long as the container's Footprint and holds no page
// (a sparse file). It goes with the container's directory.
const footprintFile = ".footprint"

// Reserve records that container id's files take need bytes.
func (s Store) Reserve(id string, need int64) error {
	p := filepath.Join(s.ContainerDir(id), footprintFile)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("state budget: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(need); err != nil {
		return fmt.Errorf("state budget: %w", err)
	}
	return nil
}

// Reserved sums the footprints the containers in the state directory
// reserved. A freshly served container holds one generation of its files;
// the refresher's first rewrite adds the second, which its footprint
// already counts.
func (s Store) Reserved() (int64, error) {
	dir := filepath.Join(s.Dir, "containers")
	entries, err := readStateDir(dir)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, e := range entries {
		if st, err := os.Lstat(filepath.Join(dir, e.Name(), footprintFile)); err == nil {
			n += st.Size()
		}
	}
	return n, nil
}

// PageSize is the unit tmpfs holds a file's data in.
var PageSize = int64(os.Getpagesize())

// inodeCost is what one file, one symlink or one directory costs besides
// its data: its inode and dentry, charged to the same memory.
const inodeCost = 1 << 10

// Footprint is what a container's files of these sizes take, in the two
// generations the writer keeps: each file's whole pages (at least one)
// and inode in each generation, and its symlink.
func Footprint(sizes []int) int64 {
	var n int64
	for _, s := range sizes {
		n += 2*(max(1, (int64(s)+PageSize-1)/PageSize)*PageSize+inodeCost) + inodeCost
	}
	return n
}
