// Package mount makes a host directory appear read-only inside a container
// that a runtime is creating, before the container's pivot_root.
//
// At createRuntime the container's mount namespace exists and its rootfs is
// mounted at the bundle's root path, but pivot_root has not happened yet.
// The hook clones the host directory as a detached bind mount (open_tree),
// makes it read-only, nosuid, nodev and noexec (mount_setattr), enters the
// container's mount namespace on a dedicated OS thread, resolves the target
// inside the rootfs the way runc resolves mount targets (filepath-securejoin:
// symlinks cannot lead out of the rootfs) and attaches the clone there
// (move_mount). A whole directory is bound, never single files, so later
// rotations show through.
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
	attr := &unix.MountAttr{Attr_set: ReadOnlyAttrs}
	if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH, attr); err != nil {
		return fmt.Errorf("mount: making %s read-only: %w", src, err)
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
	if err := unix.MoveMount(tree, "", int(dir.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("mount: attaching at %s: %w", target, err)
	}
	return nil
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
