package mount

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestOnKernelFS: with this machine's root standing for a container's
// rootfs, directories on the kernel's filesystems or under /dev, /proc and
// /sys are found through their handles, and an ordinary directory is not.
func TestOnKernelFS(t *testing.T) {
	open := func(p string) *os.File {
		f, err := os.OpenFile(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	root := open("/")
	for dir, want := range map[string]string{
		"/proc":     "procfs",
		"/proc/sys": "procfs",
		"/sys":      "sysfs",
		"/dev":      "the container's /dev",
		"/dev/shm":  "the container's /dev",
		"/dev/pts":  "devpts",
		"/etc":      "",
		t.TempDir(): "",
	} {
		got, err := onKernelFS(root, open(dir))
		if err != nil {
			t.Errorf("%s: %v", dir, err)
			continue
		}
		if got != want && !(want == "sysfs" && strings.HasPrefix(got, "the container's /sys")) {
			t.Errorf("%s: on %q, want %q", dir, got, want)
		}
	}
}

// TestBindIsPrivate: the identity mount shares no mount events with its
// source. The source is a shared tmpfs (as systemd's /run is); a process
// in a mount namespace of its own mounts over the bound directory, and the
// host's mount table under the source stays as it was. test/e2e's
// TestHostileMountPropagation mounts the same attack under runc.
func TestBindIsPrivate(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	base := t.TempDir()
	src, rootfs := filepath.Join(base, "state"), filepath.Join(base, "rootfs")
	for _, d := range []string{src, rootfs} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount("tmpfs", src, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for unix.Unmount(src, unix.MNT_DETACH) == nil {
		}
	})
	if err := unix.Mount("", src, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	// The container: a mount namespace copied from this one, so that its
	// copy of src is a peer of src, as a runtime's is of /run.
	c := exec.Command("unshare", "--mount", "--propagation", "unchanged", "sleep", "60")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	self, _ := os.Readlink("/proc/self/ns/mnt")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", c.Process.Pid)); ns != "" && ns != self {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("unshare did not enter a mount namespace of its own")
		}
	}
	pidfd, err := unix.PidfdOpen(c.Process.Pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pidfd)
	if err := Bind(pidfd, rootfs, src, "/certs"); err != nil {
		t.Fatal(err)
	}
	before := testhelp.MountsUnder(t, src)
	for i := range 3 {
		out, err := exec.Command("nsenter", "-t", strconv.Itoa(c.Process.Pid), "-m", "mount", "-t", "tmpfs", fmt.Sprint("evil", i), filepath.Join(rootfs, "certs")).CombinedOutput()
		if err != nil {
			t.Fatalf("mounting over the bound directory inside: %v: %s", err, out)
		}
	}
	if after := testhelp.MountsUnder(t, src); len(after) != len(before) {
		t.Errorf("mounts made over the bound directory reached the source's namespace: %d mounts at or under %s before, %d after", len(before), src, len(after))
	}
}
