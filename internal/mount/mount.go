// Package mount makes a host directory appear read-only inside a container
// that a runtime is creating, before the container's pivot_root.
//
// At createRuntime the container's mount namespace exists and its rootfs is
// mounted at the bundle's root path, but pivot_root has not happened yet.
// The hook clones the host directory as a detached bind mount (open_tree),
// makes it read-only, nosuid, nodev and noexec and a private mount
// (mount_setattr), enters the
// container's mount namespace on a dedicated OS thread, resolves the target
// inside the rootfs the way runc resolves mount targets (filepath-securejoin:
// symlinks cannot lead out of the rootfs) and attaches the clone there
// (move_mount). A whole directory is bound, never single files, so later
// rotations show through.
//
// The clone is made private: open_tree(OPEN_TREE_CLONE) leaves it in its
// source's peer group, so on a node whose state directory is a shared mount
// (systemd's /run) a container that may mount (a user namespace with
// CAP_SYS_ADMIN) would otherwise add mounts to the host's mount table by
// mounting over its cert_dir. A target on the kernel's filesystems (the
// container's /dev, /proc or /sys, or procfs, sysfs, cgroupfs and the like
// wherever they are mounted) is refused: stacked there the identity would
// hide what the runtime mounted.
package mount

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	securejoin "github.com/cyphar/filepath-securejoin"
	"golang.org/x/sys/unix"
)

// ReadOnlyAttrs are the attributes of every identity mount.
const ReadOnlyAttrs = unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV | unix.MOUNT_ATTR_NOEXEC

// Bind makes the host directory src appear read-only at target, a path
// inside the container's rootfs, in the mount namespace of the process
// behind pidfd. rootfs is the rootfs path as the runtime sees it.
func Bind(pidfd int, rootfs, src, target string) error {
	tree, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		if errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("mount: open_tree is not supported by this kernel (Linux 5.12 or later is needed): %w", err)
		}
		return fmt.Errorf("mount: cloning %s: %w", src, err)
	}
	defer unix.Close(tree)
	// MS_PRIVATE: the clone leaves its source's peer group, so that no
	// mount event crosses between the container's cert_dir and the host.
	attr := &unix.MountAttr{Attr_set: ReadOnlyAttrs, Propagation: unix.MS_PRIVATE}
	if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH, attr); err != nil {
		return fmt.Errorf("mount: making %s read-only and private: %w", src, err)
	}

	errc := make(chan error, 1)
	go func() {
		// This thread's filesystem context and mount namespace change for
		// good; it is never unlocked, so the Go runtime ends the thread
		// when this goroutine returns instead of reusing it.
		runtime.LockOSThread()
		errc <- attach(pidfd, tree, rootfs, target)
	}()
	return <-errc
}

func attach(pidfd, tree int, rootfs, target string) error {
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("mount: unshare(CLONE_FS): %w", err)
	}
	if err := unix.Setns(pidfd, unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("mount: entering the container's mount namespace: %w", err)
	}
	root, err := os.OpenFile(rootfs, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("mount: opening rootfs %s in the container's mount namespace: %w", rootfs, err)
	}
	defer root.Close()
	// MkdirAllHandle resolves every component inside root, following
	// symlinks as if root were "/", and returns a handle to the final
	// directory, so there is no window in which a swapped path component
	// could redirect the mount.
	dir, err := securejoin.MkdirAllHandle(root, target, 0o755)
	if err != nil {
		return fmt.Errorf("mount: creating %s inside the rootfs: %w", target, err)
	}
	defer dir.Close()
	// A symlink in the image can make cert_dir the rootfs itself
	// ("/certs -> /"); stacking the identity over the container's root
	// would leave it without a filesystem.
	if same, err := sameFile(root, dir); err != nil {
		return fmt.Errorf("mount: %w", err)
	} else if same {
		return fmt.Errorf("mount: %s resolves to the container's root directory inside the rootfs", target)
	}
	if fs, err := onKernelFS(root, dir); err != nil {
		return fmt.Errorf("mount: checking the filesystem at %s: %w", target, err)
	} else if fs != "" {
		return fmt.Errorf("mount: %s resolves to %s, a kernel filesystem: an identity there would hide what the runtime mounted; choose a cert_dir outside /dev, /proc and /sys", target, fs)
	}
	if err := unix.MoveMount(tree, "", int(dir.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("mount: attaching at %s: %w", target, err)
	}
	return nil
}

// kernelFS are the filesystems the kernel fills in: an identity stacked on
// one hides what the runtime mounted there (runc then fails on /dev/null or
// /proc/self/fd, or the container runs with /sys silently hidden).
var kernelFS = map[int64]string{
	unix.PROC_SUPER_MAGIC:     "procfs",
	unix.SYSFS_MAGIC:          "sysfs",
	unix.DEVPTS_SUPER_MAGIC:   "devpts",
	0x19800202:                "mqueue", // MQUEUE_MAGIC, not in x/sys/unix
	unix.CGROUP_SUPER_MAGIC:   "cgroup",
	unix.CGROUP2_SUPER_MAGIC:  "cgroup2",
	unix.SECURITYFS_MAGIC:     "securityfs",
	unix.DEBUGFS_MAGIC:        "debugfs",
	unix.TRACEFS_MAGIC:        "tracefs",
	unix.BPF_FS_MAGIC:         "bpf",
	unix.PSTOREFS_MAGIC:       "pstore",
	unix.EFIVARFS_MAGIC:       "efivarfs",
	unix.SELINUX_MAGIC:        "selinuxfs",
	unix.SMACK_MAGIC:          "smackfs",
	unix.BINFMTFS_MAGIC:       "binfmt_misc",
	unix.NSFS_MAGIC:           "nsfs",
	unix.HUGETLBFS_MAGIC:      "hugetlbfs",
	unix.RDTGROUP_SUPER_MAGIC: "resctrl",
	0x62656570:                "configfs", // CONFIGFS_MAGIC
	0x65735543:                "fusectl",  // FUSE_CTL_SUPER_MAGIC
}

// kernelDirs are where runtimes mount the kernel's filesystems in a
// container. /dev and /dev/shm are tmpfs there, so they are found by place
// as well as by type. internal/annotations refuses the same directories as
// written; this package refuses them however the image's symlinks reach
// them.
var kernelDirs = []string{"/dev", "/proc", "/sys"}

// onKernelFS tells whether dir, a directory inside root, is on one of the
// kernel's filesystems or at or under the container's /dev, /proc or /sys,
// and names which. Both are read through the handles, never through paths.
func onKernelFS(root, dir *os.File) (string, error) {
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(int(dir.Fd()), &sfs); err != nil {
		return "", err
	}
	if name, ok := kernelFS[int64(sfs.Type)]; ok {
		return name, nil
	}
	marks := map[[2]uint64]string{}
	for _, p := range kernelDirs {
		f, err := securejoin.OpenatInRoot(root, p)
		if err != nil {
			continue // not in the image, so nothing is mounted there
		}
		var st unix.Stat_t
		err = unix.Fstat(int(f.Fd()), &st)
		f.Close()
		if err != nil {
			return "", err
		}
		marks[[2]uint64{st.Dev, st.Ino}] = "the container's " + p
	}
	var rst unix.Stat_t
	if err := unix.Fstat(int(root.Fd()), &rst); err != nil {
		return "", err
	}
	// Walk up from dir through "..": securejoin resolved dir inside root,
	// so the walk ends there (a path of at most 4096 bytes has at most
	// 2048 components).
	cur, err := unix.Dup(int(dir.Fd()))
	if err != nil {
		return "", err
	}
	defer func() { unix.Close(cur) }()
	for range 2048 {
		var st unix.Stat_t
		if err := unix.Fstat(cur, &st); err != nil {
			return "", err
		}
		if st.Dev == rst.Dev && st.Ino == rst.Ino {
			return "", nil
		}
		if name, ok := marks[[2]uint64{st.Dev, st.Ino}]; ok {
			return name, nil
		}
		parent, err := unix.Openat(cur, "..", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return "", err
		}
		unix.Close(cur)
		cur = parent
	}
	return "", unix.ELOOP
}

func sameFile(a, b *os.File) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Fstat(int(a.Fd()), &sa); err != nil {
		return false, err
	}
	if err := unix.Fstat(int(b.Fd()), &sb); err != nil {
		return false, err
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}
