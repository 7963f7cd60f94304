package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
)

const anyRootID = "spiffe://example.org/workload/any-root"

// newRootEnv registers a workload entry that any process running as uid 0
// matches, whichever runtime binary it was started from.
func newRootEnv(t *testing.T) *env {
	e := startEnv(t)
	e.spire.CreateEntry(t, anyRootID, []string{"unix:uid:0"}, time.Hour)
	e.waitSynced()
	return e
}

// TestUserNamespace: a container whose user namespace maps container ids
// 0-65535 to host ids 100000-165535, running as uid 1000, reads its key;
// inside the key belongs to 1000 with mode 0600, on the host to 101000.
// A process uid without a mapping is refused.
func TestUserNamespace(t *testing.T) {
	e := startEnv(t)
	// In a user namespace "runc init" is container root, which the agent
	// (reading /proc on the host) sees as the mapped host uid.
	const usernsID = "spiffe://example.org/workload/userns"
	e.spire.CreateEntry(t, usernsID, []string{"unix:uid:100000"}, time.Hour)
	e.waitSynced()
	newUserNSBundle := func(t *testing.T, args []string, size uint32) *bundle {
		b := newBundle(t, args)
		if err := b.AddOrReplaceLinuxNamespace("user", ""); err != nil {
			t.Fatal(err)
		}
		b.AddLinuxUIDMapping(100000, 0, size)
		b.AddLinuxGIDMapping(100000, 0, size)
		b.SetProcessUID(1000)
		b.SetProcessGID(1000)
		// The rootfs belongs to host root, which is unmapped inside: make
		// it readable to "nobody".
		os.Chmod(b.dir, 0o755)
		os.Chmod(b.rootfs, 0o755)
		b.AddAnnotation(annotation, "- cert_dir: /certs\n")
		b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
		return b
	}

	t.Run("mapped", func(t *testing.T) {
		b := newUserNSBundle(t, []string{"/bin/sh", "-c", printFiles("/certs")}, 65536)
		out, stderr, err := b.runc(t)
		if err != nil {
			t.Fatalf("runc run: %v\nstderr: %s", err, stderr)
		}
		if got := strings.TrimSpace(section(t, out, "id")); got != "1000" {
			t.Fatalf("container runs as uid %s", got)
		}
		checkSVID(t, section(t, out, "cert"), section(t, out, "key"), section(t, out, "bundle"), usernsID)
		if got := strings.TrimSpace(section(t, out, "keystat")); got != "600 1000 1000" {
			t.Errorf("inside the container the key is %q, want \"600 1000 1000\"", got)
		}
		key := filepath.Join(e.stateDir, "containers", b.id, "0", "svid_key.pem")
		st, err := os.Stat(key)
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if sys.Uid != 101000 || sys.Gid != 101000 || st.Mode().Perm() != 0o600 {
			t.Errorf("on the host the key is %o %d:%d, want 600 101000:101000", st.Mode().Perm(), sys.Uid, sys.Gid)
		}
	})

	t.Run("unmapped uid", func(t *testing.T) {
		b := newUserNSBundle(t, []string{"/bin/echo", "STARTED"}, 1000) // maps 0-999 only
		out, stderr, err := b.runc(t)
		if err == nil || strings.Contains(out, "STARTED") {
			t.Fatalf("the container started: %q", out)
		}
		if !strings.Contains(stderr, "process uid 1000 has no mapping in linux.uidMappings") {
			t.Errorf("runc's error lacks the hook's reason: %s", stderr)
		}
		for _, p := range e.listState() {
			if strings.Contains(p, b.id) {
				t.Errorf("state directory holds %s of the refused container", p)
			}
		}
	})
}

// TestCrun: the hook works under crun as under runc. crun refuses this
// machine's hybrid cgroups while cgroup v2 holds a controller; test/deps.sh
// moves hugetlb to v1 once, and then crun runs.
func TestCrun(t *testing.T) {
	e := newRootEnv(t)
	if _, err := exec.LookPath("crun"); err != nil {
		t.Fatal("crun is missing: run test/deps.sh")
	}
	b := newBundle(t, []string{"/bin/sh", "-c", printFiles("/certs")})
	// Debian's crun 1.8 knows specs up to 1.1 and refuses runtime-spec
	// v1.2.1's "1.2.1" ("unknown version specified").
	b.Config.Version = "1.1.0"
	b.AddAnnotation(annotation, "- cert_dir: /certs\n")
	h := e.hook(e.config)
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{h}, Poststop: []rspec.Hook{h}}
	out, stderr, err := b.run(t, "crun")
	if err != nil {
		t.Fatalf("crun run: %v\nstderr: %s\n(on hybrid cgroups crun needs test/deps.sh's hugetlb mount)", err, stderr)
	}
	checkSVID(t, section(t, out, "cert"), section(t, out, "key"), section(t, out, "bundle"), anyRootID)
	mnt := section(t, out, "mount")
	if opts := strings.Split(strings.Fields(mnt)[5], ","); !slices.Contains(opts, "ro") || !slices.Contains(opts, "noexec") {
		t.Errorf("mount under crun: %s", mnt)
	}
	if strings.Contains(out, "WRITABLE") {
		t.Error("the container could write into cert_dir")
	}
	if got := e.listState(); !clean(got) {
		t.Errorf("after crun ran poststop the state directory holds %v", got)
	}
}
