package mount

import (
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
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
