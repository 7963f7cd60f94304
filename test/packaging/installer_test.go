package packaging

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// installerRoot is a directory standing in for the installer container: a
// busybox root file system, the image's hook at /usr/bin, the ConfigMap at
// /install/node, and the host directories the DaemonSet mounts under /host
// as plain directories.
type installerRoot struct {
	dir    string
	d      nodeDeployment
	script string
	env    []string
}

// hostPaths are the host directories the base's installer mounts, as the
// script names them.
var installerHostDirs = []string{"/host/hooks.d", "/host/opt/spiffe-oci-hook/bin", "/host/etc/spiffe-oci-hook", "/host/run/spiffe-oci-hook"}

func newInstallerRoot(t *testing.T) *installerRoot {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root: chroot and a read-only bind mount")
	}
	needTools(t, "unshare", "chroot")
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("busybox-static is missing (test/deps.sh installs it): %v", err)
	}
	docs, built := buildKustomization(t, filepath.Join(testhelp.RepoRoot(t), "deploy", "kubernetes", "base"))
	d := checkNodeDeployment(t, docs, built, wantHooksDir("crio", built))
	r := &installerRoot{dir: t.TempDir(), d: d, script: d.script}
	for _, e := range d.install.Env {
		r.env = append(r.env, e.Name+"="+e.Value)
	}
	for _, m := range d.install.VolumeMounts {
		if v := d.volumes[m.Name]; v.HostPath != nil && !slices.Contains(installerHostDirs, m.MountPath) {
			t.Fatalf("the installer mounts the host's %s at %s, which this test does not provide", v.HostPath.Path, m.MountPath)
		}
	}
	for _, dir := range append([]string{"/bin", "/usr/bin", "/install/node", "/tmp", "/dev"}, installerHostDirs...) {
		if err := os.MkdirAll(filepath.Join(r.dir, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The mount point for the host's /dev/null, as a container has one.
	if err := os.WriteFile(filepath.Join(r.dir, "dev", "null"), nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(r.dir, "bin", "busybox"), busybox, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"sh", "cp", "chmod", "mv", "dirname", "basename", "touch", "rm", "cmp", "echo", "cat"} {
		if err := os.Symlink("busybox", filepath.Join(r.dir, "bin", a)); err != nil {
			t.Fatal(err)
		}
	}
	var cm manifest
	for _, m := range only(docs, "ConfigMap") {
		if _, ok := m.Data["spiffe-oci-hook.json"]; ok {
			cm = m
		}
	}
	for k, v := range cm.Data {
		if err := os.WriteFile(filepath.Join(r.dir, "install", "node", k), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

// image puts stand-in hook binaries of version v where the image has them.
func (r *installerRoot) image(t *testing.T, v string) {
	t.Helper()
	for _, name := range []string{"spiffe-oci-hook", "spiffe-oci-hook-direct"} {
		hook := "#!/bin/sh\necho " + name + " " + v + " >&2\n"
		if err := os.WriteFile(filepath.Join(r.dir, "usr", "bin", name), []byte(hook), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// run runs the install script chrooted into the root, in a mount namespace
// of its own where the directories listed in readOnly are read-only binds.
func (r *installerRoot) run(t *testing.T, readOnly ...string) (stdout, stderr string, err error) {
	t.Helper()
	setup := "mount --bind /dev/null " + filepath.Join(r.dir, "dev", "null") + " && "
	for _, dir := range readOnly {
		p := filepath.Join(r.dir, dir)
		setup += "mount --bind " + p + " " + p + " && mount -o remount,bind,ro " + p + " && "
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", setup+`exec chroot "$0" /bin/sh -c "$1"`, r.dir, r.script)
	// The host's sbin for chroot and mount; inside, /bin and /usr/bin.
	cmd.Env = append([]string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}, r.env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	return out.String(), errb.String(), err
}

func (r *installerRoot) host(p string) string { return filepath.Join(r.dir, "host", p) }

// TestInstallerUpgrade runs the base's install script for real: a first
// install puts the hook, the node config and, last, the JSON (the
// ConfigMap's, byte for byte) in place with their modes and leaves nothing
// aside; an upgrade replaces the binary by rename, so the host's path holds
// the new version while a hook that was running keeps the old file, and the
// script reports the version now on the host.
func TestInstallerUpgrade(t *testing.T) {
	r := newInstallerRoot(t)
	r.image(t, "v1")
	out, stderr, err := r.run(t)
	if err != nil {
		t.Fatalf("first install: %v\n%s%s", err, out, stderr)
	}
	hook := r.host("opt/spiffe-oci-hook/bin/spiffe-oci-hook")
	for p, want := range map[string]os.FileMode{
		hook: 0o755,
		r.host("opt/spiffe-oci-hook/bin/spiffe-oci-hook-direct"): 0o755,
		r.host("etc/spiffe-oci-hook/config.yaml"):                0o644,
		r.host("hooks.d/spiffe-oci-hook.json"):                   0o644,
		r.host("run/spiffe-oci-hook"):                            os.ModeDir | 0o700,
	} {
		st, err := os.Stat(p)
		if err != nil {
			t.Errorf("after install: %v", err)
		} else if st.Mode() != want {
			t.Errorf("%s: mode %v, want %v", p, st.Mode(), want)
		}
	}
	if got, _ := os.ReadFile(r.host("hooks.d/spiffe-oci-hook.json")); !bytes.Equal(got, r.d.hooksJSON) {
		t.Errorf("installed JSON differs from the ConfigMap's:\n%s", got)
	}
	want := "installed spiffe-oci-hook v1, its hooks JSON in " + r.d.hooksDir
	if strings.TrimSpace(out) != want {
		t.Errorf("first install printed %q, want %q", out, want)
	}

	// A hook running the old binary holds it open across the upgrade.
	old, err := os.Open(hook)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	var before syscall.Stat_t
	syscall.Fstat(int(old.Fd()), &before)
	r.image(t, "v2")
	out, stderr, err = r.run(t)
	if err != nil {
		t.Fatalf("upgrade: %v\n%s%s", err, out, stderr)
	}
	if got, _ := os.ReadFile(hook); !strings.Contains(string(got), "v2") {
		t.Errorf("after the upgrade the host's hook is\n%s", got)
	}
	var after syscall.Stat_t
	syscall.Stat(hook, &after)
	if after.Ino == before.Ino {
		t.Error("the upgrade rewrote the hook binary in place: a hook running it could read a torn file")
	}
	if kept, _ := os.ReadFile("/proc/self/fd/" + strconv.Itoa(int(old.Fd()))); !strings.Contains(string(kept), "v1") {
		t.Errorf("the running hook's file changed under it:\n%s", kept)
	}
	if !strings.Contains(out, "installed spiffe-oci-hook v2,") {
		t.Errorf("the upgrade printed %q, want the host's new version", out)
	}
	for _, dir := range installerHostDirs {
		ents, _ := os.ReadDir(filepath.Join(r.dir, dir))
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), ".") {
				t.Errorf("%s/%s left behind", dir, e.Name())
			}
		}
	}
}

// TestInstallerReadOnlyHooksDir: where the hooks directory is read-only
// (an image-based host's /usr), the installer stops with one line naming
// the directory and what to install instead, before writing anything.
func TestInstallerReadOnlyHooksDir(t *testing.T) {
	r := newInstallerRoot(t)
	r.image(t, "v1")
	out, stderr, err := r.run(t, "/host/hooks.d")
	if err == nil {
		t.Fatalf("the installer succeeded with a read-only hooks directory:\n%s", out)
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "cannot write "+r.d.hooksDir) || !strings.Contains(lines[0], "openshift") {
		t.Errorf("stderr %q, want one line naming %s and the openshift overlay", stderr, r.d.hooksDir)
	}
	for _, dir := range installerHostDirs {
		if ents, _ := os.ReadDir(filepath.Join(r.dir, dir)); len(ents) != 0 {
			t.Errorf("%s holds %d entries after the refusal", dir, len(ents))
		}
	}
}
