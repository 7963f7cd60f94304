// Package systemd runs the shipped refresher unit, a SPIRE server and agent,
// and Quadlet-style Podman services under a real systemd: PID 1 of a
// privileged Podman container whose root is this machine's own root file
// system (an overlay, so nothing it installs reaches the host).
//
// The container sees only the host's cgroup v2 hierarchy, bound at
// /sys/fs/cgroup. systemd then runs in unified mode and mounts no v1
// hierarchy: binding the host's whole /sys/fs/cgroup tmpfs instead makes it
// create perf_event, net_cls, net_prio, cpu,cpuacct and net_cls,net_prio on
// the host's tmpfs, which breaks crun on the host until they are removed.
// The cgroups it creates sit under the container's own cgroup, which Podman
// removes with the container; those that escape to the v2 root (see
// restoreCgroups) are removed at cleanup, and the test fails if it cannot
// put the host's cgroup tree back as it found it.
package systemd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
)

const cgroupRoot = "/sys/fs/cgroup"

// nodeTops are the names the node creates at the v2 root (see
// restoreCgroups).
var nodeTops = []string{"machine.slice", "systemd", "blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer",
	"hugetlb", "memory", "pids", "perf_event", "net_cls", "net_prio", "net_cls,net_prio", "cpu,cpuacct", "misc", "rdma"}

// node is the systemd container.
type node struct {
	t      *testing.T
	name   string
	dir    string   // host temp dir: the private Podman storage
	podman []string // podman and its global flags
	id     string   // container id

	cleanupOnce sync.Once
	before      cgroupSnapshot
}

// cgroupSnapshot is the part of the host's cgroup tree the node can touch.
type cgroupSnapshot struct {
	top     []string            // entries of /sys/fs/cgroup (tmpfs on hybrid hosts)
	v2      string              // the cgroup v2 mount bound into the node
	v2Dirs  map[string]struct{} // every directory under v2
	tmpfsRO bool                // /sys/fs/cgroup is a read-only tmpfs
}

// v2Mount returns where the host's cgroup v2 hierarchy is mounted: all of
// /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one.
func v2Mount() (string, bool) {
	for _, p := range []string{cgroupRoot, filepath.Join(cgroupRoot, "unified")} {
		var st unix.Statfs_t
		if unix.Statfs(p, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			return p, true
		}
	}
	return "", false
}

func snapshotCgroups(t *testing.T, v2 string) cgroupSnapshot {
	t.Helper()
	s := cgroupSnapshot{v2: v2, v2Dirs: map[string]struct{}{}}
	entries, err := os.ReadDir(cgroupRoot)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		s.top = append(s.top, e.Name())
	}
	var st unix.Statfs_t
	if unix.Statfs(cgroupRoot, &st) == nil && st.Type == unix.TMPFS_MAGIC {
		s.tmpfsRO = st.Flags&unix.ST_RDONLY != 0
	}
	filepath.WalkDir(v2, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			s.v2Dirs[p] = struct{}{}
		}
		return nil
	})
	return s
}

// skipUnlessNode skips the test where the node cannot run.
func skipUnlessNode(t *testing.T) {
	t.Helper()
	if os.Getenv("SPIFFE_OCI_SYSTEMD") != "1" {
		t.Skip("run by make test-systemd (SPIFFE_OCI_SYSTEMD=1): boots systemd in a privileged Podman container")
	}
	spiretest.RequireRoot(t)
	for _, tool := range []string{"podman", "runc", "/lib/systemd/systemd", "/bin/busybox", "systemd-analyze"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing (test/deps.sh installs it): %v", tool, err)
		}
	}
}

// bootNode starts the node and waits until systemd has finished booting.
// Everything it starts is removed when the test ends, on failure and on
// SIGINT/SIGTERM too.
func bootNode(t *testing.T, mounts map[string]string) *node {
	t.Helper()
	v2, ok := v2Mount()
	if !ok {
		t.Skip("no cgroup v2 hierarchy on this host")
	}
	dir, err := os.MkdirTemp("/tmp", "soh-node-")
	if err != nil {
		t.Fatal(err)
	}
	suffix := make([]byte, 4)
	rand.Read(suffix)
	n := &node{
		t:    t,
		name: "soh-systemd-" + hex.EncodeToString(suffix),
		dir:  dir,
		podman: []string{"podman", "--root", filepath.Join(dir, "root"), "--runroot", filepath.Join(dir, "runroot"),
			"--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"},
		before: snapshotCgroups(t, v2),
	}
	t.Cleanup(n.cleanup)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		if _, ok := <-sig; ok {
			n.cleanup()
			os.Exit(1)
		}
	}()
	t.Cleanup(func() { signal.Stop(sig); close(sig) })

	args := append(slices.Clone(n.podman[1:]), "run", "-d", "--name", n.name,
		"--privileged", "--network", "none", "--hostname", "soh-node",
		// systemd as PID 1 without Podman's --systemd mode, whose own /tmp
		// tmpfs copies up the host's busy /tmp (runc's tmpcopyup races
		// with files vanishing there).
		"--systemd", "false", "-e", "container=podman", "--stop-signal", "RTMIN+3",
		"--cgroupns", "host", "-v", v2+":"+cgroupRoot+":rw",
		"--mount", "type=tmpfs,destination=/tmp,notmpcopyup",
		"--mount", "type=tmpfs,destination=/run,notmpcopyup",
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
	for src, dst := range mounts {
		args = append(args, "-v", src+":"+dst+":ro")
	}
	// --rootfs is a flag without a value: the root is the first argument,
	// and every flag must come before it.
	args = append(args, "--rootfs", "/:O", "/lib/systemd/systemd", "--unit=basic.target")
	out, err := exec.Command(n.podman[0], args...).CombinedOutput()
	if err != nil {
		t.Fatalf("podman run (systemd): %v\n%s", err, out)
	}
	n.id = strings.TrimSpace(string(out))
	// The first exec can come before systemd listens on its bus.
	state, err := n.shTimeout(2*time.Minute, `i=0; until [ -S /run/systemd/private ] || [ $i -ge 120 ]; do i=$((i+1)); sleep 0.5; done; systemctl is-system-running --wait`)
	state = strings.TrimSpace(state)
	if state != "running" && state != "degraded" {
		logs, _ := exec.Command(n.podman[0], append(n.podman[1:], "logs", n.name)...).CombinedOutput()
		t.Fatalf("systemd did not finish booting: %q %v\n%s", state, err, lastLines(string(logs), 40))
	}
	if state == "degraded" {
		failed, _ := n.sh("systemctl --failed --no-legend")
		t.Logf("systemd is degraded (units of this host that do not start in a container):\n%s", failed)
	}
	return n
}

// sh runs a shell script in the node.
func (n *node) sh(script string) (string, error) {
	return n.shTimeout(3*time.Minute, script)
}

func (n *node) shTimeout(timeout time.Duration, script string) (string, error) {
	return n.shInput(timeout, nil, script)
}

func (n *node) shInput(timeout time.Duration, stdin []byte, script string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	args := append(slices.Clone(n.podman[1:]), "exec")
	if stdin != nil {
		args = append(args, "-i")
	}
	args = append(args, n.name, "/bin/sh", "-c", script)
	cmd := exec.CommandContext(ctx, n.podman[0], args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %s: %w", timeout, err)
	}
	return string(out), err
}

// must runs a script in the node and fails the test if it fails.
func (n *node) must(script string) string {
	n.t.Helper()
	out, err := n.sh(script)
	if err != nil {
		n.t.Fatalf("in the node: %s: %v\n%s", script, err, lastLines(out, 60))
	}
	return out
}

// write puts a file into the node.
func (n *node) write(path, content string, mode os.FileMode) {
	n.t.Helper()
	script := fmt.Sprintf("mkdir -p %q && cat > %q && chmod %o %q", filepath.Dir(path), path, mode, path)
	if out, err := n.shInput(time.Minute, []byte(content), script); err != nil {
		n.t.Fatalf("writing %s in the node: %v\n%s", path, err, out)
	}
}

// cleanup removes the node and its storage, then puts the host's cgroup
// tree back as it was.
func (n *node) cleanup() {
	n.cleanupOnce.Do(func() {
		t := n.t
		// RTMIN+3 shuts systemd down (its units and their containers).
		if out, err := exec.Command(n.podman[0], append(n.podman[1:], "rm", "-f", "-t", "20", n.name)...).CombinedOutput(); err != nil {
			t.Errorf("removing the node: %v\n%s", err, out)
		}
		exec.Command(n.podman[0], append(n.podman[1:], "rm", "-a", "-f")...).Run()
		n.removeStorage()
		n.restoreCgroups()
	})
}

// removeStorage unmounts what Podman left mounted in the private storage
// (its overlay driver binds its home) and deletes it, never crossing a
// mount point.
func (n *node) removeStorage() {
	t := n.t
	mounts, err := mountsUnder(n.dir)
	if err != nil {
		t.Errorf("reading mounts: %v", err)
		return
	}
	for _, m := range mounts {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting %s: %v", m, err)
		}
	}
	if left, _ := mountsUnder(n.dir); len(left) > 0 {
		t.Errorf("still mounted under %s, not removing it: %q", n.dir, left)
		return
	}
	if err := os.RemoveAll(n.dir); err != nil {
		t.Errorf("removing %s: %v", n.dir, err)
	}
}

// mountsUnder lists mount points at or under dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			out = append(out, f[4])
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, nil
}

// restoreCgroups removes the cgroups the node left in the v2 hierarchy and
// any new entry on a hybrid host's /sys/fs/cgroup tmpfs, and reports what it
// could not put back.
func (n *node) restoreCgroups() {
	t := n.t
	b := n.before
	var leaked []string
	filepath.WalkDir(b.v2, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if _, ok := b.v2Dirs[p]; ok {
			return nil
		}
		// Only what is certainly the node's: its own cgroup; machine.slice,
		// where runc's systemd driver inside puts containers (this host has
		// no systemd of its own); and v1 controller names at the v2 root,
		// where Podman inside, reading the v1 lines of /proc/self/cgroup
		// against a cgroup2 /sys/fs/cgroup, moves itself to a "runtime"
		// cgroup. Other runtimes on this host create cgroups at any time;
		// those are not touched.
		rel := strings.TrimPrefix(p, b.v2+"/")
		top, _, _ := strings.Cut(rel, "/")
		if strings.Contains(rel, n.id) || slices.Contains(nodeTops, top) {
			leaked = append(leaked, p)
		}
		return nil
	})
	sort.Slice(leaked, func(i, j int) bool { return len(leaked[i]) > len(leaked[j]) })
	for _, p := range leaked {
		// Wait briefly for processes to leave (a cgroup with members
		// cannot be removed).
		var err error
		for i := 0; i < 50; i++ {
			if err = unix.Rmdir(p); err == nil || os.IsNotExist(err) {
				err = nil
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Errorf("cgroup %s left by the node: %v", p, err)
		}
	}
	if len(leaked) > 0 {
		t.Logf("removed %d cgroups the node left in the v2 hierarchy", len(leaked))
	}

	entries, _ := os.ReadDir(cgroupRoot)
	var extra []string
	for _, e := range entries {
		if !slices.Contains(b.top, e.Name()) && !isMountPoint(filepath.Join(cgroupRoot, e.Name())) {
			extra = append(extra, filepath.Join(cgroupRoot, e.Name()))
		}
	}
	if len(extra) == 0 {
		return
	}
	t.Errorf("the node created %q on the host's %s; removing them", extra, cgroupRoot)
	if b.tmpfsRO {
		unix.Mount("", cgroupRoot, "", unix.MS_REMOUNT, "mode=755")
	}
	for _, p := range extra {
		if err := os.Remove(p); err != nil {
			t.Errorf("removing %s: %v", p, err)
		}
	}
	if b.tmpfsRO {
		unix.Mount("", cgroupRoot, "", unix.MS_REMOUNT|unix.MS_RDONLY, "mode=755")
	}
}

func isMountPoint(p string) bool {
	mounts, _ := mountsUnder(p)
	return slices.Contains(mounts, p)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{"..."}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}
