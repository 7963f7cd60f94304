package e2e

// Hostile tenants against the identity mount itself (issue 24, defects 1,
// 5 and 6), with runc and the real hook: a container that may mount inside
// its own namespace, a cert_dir on the kernel's filesystems, and file names
// of the longest length the parser takes.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-tools/generate/seccomp"
	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestHostileMountPropagation: on a node whose state directory is a shared
// mount (systemd's /run is), a container with a user namespace and
// CAP_SYS_ADMIN mounts tmpfs after tmpfs over its cert_dir. Each mount
// stays inside the container: the host's mount table under the state
// directory is what it was, and poststop cleans up as usual.
func TestHostileMountPropagation(t *testing.T) {
	e := startEnv(t)
	// In a user namespace "runc init" is container root, which the agent
	// sees as the mapped host uid.
	const adminID = "spiffe://example.org/workload/userns-admin"
	e.spire.CreateEntry(t, adminID, []string{"unix:uid:100000"}, time.Hour)
	e.waitSynced()
	if err := unix.Mount("", e.stateDir, "", unix.MS_SHARED, ""); err != nil {
		t.Fatalf("making the state directory a shared mount: %v", err)
	}
	// The host's mounts under the state directory only: other tests on
	// the node mount too.
	before := testhelp.MountsUnder(t, e.stateDir)

	const stacked = 20
	script := fmt.Sprintf(`cat /certs/svid.pem >/dev/null || exit 1
echo "=== mount ==="; grep " /certs " /proc/self/mountinfo; echo "=== end mount ==="
n=0
while [ $n -lt %d ]; do /bin/busybox mount -t tmpfs evil$n /certs || exit 2; n=$((n+1)); done
echo MOUNTED
`, stacked)
	b := newBundle(t, []string{"/bin/sh", "-c", script})
	if err := b.AddOrReplaceLinuxNamespace("user", ""); err != nil {
		t.Fatal(err)
	}
	b.AddLinuxUIDMapping(100000, 0, 65536)
	b.AddLinuxGIDMapping(100000, 0, 65536)
	if err := b.AddProcessCapability("CAP_SYS_ADMIN"); err != nil {
		t.Fatal(err)
	}
	// The default seccomp profile follows the capabilities (as Docker's
	// and Podman's do): with CAP_SYS_ADMIN it allows mount(2).
	b.Config.Linux.Seccomp = seccomp.DefaultProfile(b.Config)
	// The rootfs belongs to host root, which is unmapped inside.
	os.Chmod(b.dir, 0o755)
	os.Chmod(b.rootfs, 0o755)
	b.AddAnnotation(annotation, "- cert_dir: /certs\n")
	h := e.hook(e.config)
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{h}, Poststop: []rspec.Hook{h}}
	delivery := filepath.Join(e.stateDir, "containers", b.id, "0")
	t.Cleanup(func() {
		for range stacked + 1 {
			if unix.Unmount(delivery, unix.MNT_DETACH) != nil {
				break
			}
		}
	})

	out, stderr, err := b.runc(t)
	if !strings.Contains(out, "MOUNTED") {
		t.Fatalf("the container could not mount over its cert_dir, so the attack was not tried: %v\nout: %s\nstderr: %s", err, out, stderr)
	}
	t.Logf("/certs inside the container: %s", strings.TrimSpace(section(t, out, "mount")))
	if err != nil {
		t.Errorf("runc run: %v\nstderr: %s", err, stderr)
	}
	after := testhelp.MountsUnder(t, e.stateDir)
	if len(after) != len(before) {
		t.Errorf("the container's mounts reached the host: %d mounts under the state directory before, %d after: %v", len(before), len(after), after)
	}
	if got := e.listState(); !clean(got) {
		t.Errorf("after poststop the state directory holds %v", got)
	}
}

// TestHostileKernelFilesystems: a cert_dir on /dev, /proc, /sys or what lies
// under them, named in the annotation or reached through a symlink in the
// image, is refused by the hook with its line naming cert_dir, before
// anything is mounted; the container does not start and leaves no state.
// Stacked there, the identity would hide what runc mounted: runc then
// fails later without the hook's line (/dev, /proc), or the container
// starts with /sys or /dev/shm silently hidden.
func TestHostileKernelFilesystems(t *testing.T) {
	e := newEnv(t)
	cases := []struct {
		name, certDir, link string // link: /certs in the image points there
	}{
		{name: "cert_dir /dev", certDir: "/dev"},
		{name: "cert_dir /dev/shm", certDir: "/dev/shm"},
		{name: "cert_dir /proc", certDir: "/proc"},
		{name: "cert_dir /proc/sys", certDir: "/proc/sys"},
		{name: "cert_dir /sys", certDir: "/sys"},
		{name: "cert_dir /sys/fs/cgroup", certDir: "/sys/fs/cgroup"},
		{name: "image symlink to /dev", certDir: "/certs", link: "/dev"},
		{name: "image symlink to ../dev", certDir: "/certs", link: "../dev"},
		{name: "image symlink to /dev/shm", certDir: "/certs", link: "/dev/shm"},
		{name: "image symlink to /dev/pts", certDir: "/certs", link: "/dev/pts"},
		{name: "image symlink to /dev/mqueue", certDir: "/certs", link: "/dev/mqueue"},
		{name: "image symlink to /proc", certDir: "/certs", link: "/proc"},
		{name: "image symlink to /proc/sys", certDir: "/certs", link: "/proc/sys"},
		{name: "image symlink to /sys", certDir: "/certs", link: "/sys"},
		{name: "image symlink to /sys/fs/cgroup", certDir: "/certs", link: "/sys/fs/cgroup"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := newBundle(t, []string{"/bin/sh", "-c", "echo STARTED"})
			if c.link != "" {
				symlink(t, c.link, b.rootfs, "certs")
			}
			b.AddAnnotation(annotation, "- cert_dir: "+c.certDir+"\n")
			b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
			rootfsBefore := snapshot(t, b.rootfs)
			mountsBefore := testhelp.MountsUnder(t, b.dir, e.stateDir)

			out, stderr, err := b.runc(t)
			t.Logf("stderr: %s", strings.TrimSpace(stderr))
			refusedCleanly(t, e, b, rootfsBefore, out, stderr, err, "container "+b.id+":", "annotation "+annotation, "cert_dir", c.certDir, "kernel filesystem")
			if m := testhelp.MountsUnder(t, b.dir, e.stateDir); len(m) != len(mountsBefore) {
				t.Errorf("mounted on the host: %v", m)
			}
		})
	}
}

// TestLongestFileNames: file names of 255 bytes, the most the parser takes
// (and NAME_MAX), are written and read inside the container; none is
// accepted and then fails in the writer.
func TestLongestFileNames(t *testing.T) {
	e := newEnv(t)
	svid, key, bundle := strings.Repeat("c", 255), strings.Repeat("k", 255), strings.Repeat("b", 250)
	b := newBundle(t, []string{"/bin/sh", "-c", fmt.Sprintf(`set -e
cat /certs/%s /certs/%s /certs/%s >/dev/null
echo READ`, svid, key, bundle)})
	b.AddAnnotation(annotation, fmt.Sprintf("- cert_dir: /certs\n  svid_file_name: %s\n  svid_key_file_name: %s\n  svid_bundle_file_name: %s\n", svid, key, bundle))
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	out, stderr, err := b.runc(t)
	if err != nil || !strings.Contains(out, "READ") {
		t.Fatalf("the container did not read its files of 255-byte names: %v\nout: %s\nstderr: %s", err, out, stderr)
	}
}
