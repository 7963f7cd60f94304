package cri

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The images the pods run: a busybox-static rootfs, imported with Podman
// (no registry is reachable here). The same image serves as the pause
// image: CRI-O only needs it present (it drops the infra container of a
// pod that shares no pid namespace); containerd runs it as the sandbox,
// which its CMD keeps alive.
const (
	busyboxImage = "localhost/spiffe-oci-hook-test/busybox:cri"
	pauseImage   = "localhost/spiffe-oci-hook-test/pause:cri"
)

var busyboxApplets = []string{"sh", "cat", "ls", "stat", "grep", "sed", "test", "sleep", "id", "echo", "true", "head", "readlink", "mountpoint", "wc", "md5sum"}

// rootfsTar writes a busybox rootfs tarball under dir.
func rootfsTar(t *testing.T, dir string) string {
	t.Helper()
	rootfs := filepath.Join(dir, "rootfs")
	for _, d := range []string{"bin", "proc", "dev", "sys", "tmp", "etc", "run"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("busybox-static is missing (test/deps.sh): %v", err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin", "busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, a := range busyboxApplets {
		if err := os.Symlink("busybox", filepath.Join(rootfs, "bin", a)); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(rootfs, "etc", "passwd"), []byte("root:x:0:0:root:/:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(rootfs, "etc", "group"), []byte("root:x:0:\n"), 0o644)
	tarball := filepath.Join(dir, "rootfs.tar")
	if out, err := exec.Command("tar", "-C", rootfs, "-cf", tarball, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, out)
	}
	os.RemoveAll(rootfs)
	return tarball
}

// podmanImport imports the busybox rootfs as both images into the
// containers-storage at root/runroot (a test's own store, never the
// host's).
func podmanImport(t *testing.T, dir, root, runroot string) {
	t.Helper()
	tarball := rootfsTar(t, dir)
	podman := func(args ...string) {
		t.Helper()
		base := []string{"--root", root, "--runroot", runroot, "--storage-driver", "overlay",
			"--tmpdir", filepath.Join(dir, "podman-tmp"), "--events-backend", "none"}
		if out, err := exec.Command("podman", append(base, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("podman %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	podman("import", "--change", `CMD ["/bin/sleep", "2147483647"]`, tarball, busyboxImage)
	podman("tag", busyboxImage, pauseImage)
	// Import mounts nothing: the store goes with the temp dir.
}

// podmanSave writes both images to a docker-archive for ctr import.
func podmanSave(t *testing.T, dir string) string {
	t.Helper()
	root, runroot := filepath.Join(dir, "podman-root"), filepath.Join(dir, "podman-runroot")
	podmanImport(t, dir, root, runroot)
	archive := filepath.Join(dir, "images.tar")
	cmd := exec.Command("podman", "--root", root, "--runroot", runroot, "--storage-driver", "overlay",
		"--tmpdir", filepath.Join(dir, "podman-tmp"), "--events-backend", "none",
		"save", "--multi-image-archive", "-o", archive, busyboxImage, pauseImage)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("podman save: %v\n%s", err, out)
	}
	return archive
}
