package cri

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containers/common/pkg/hooks"
	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/test/criconf"
)

// crioHosts is what CRI-O (and the conmon, runc and hooks under it) sees at
// host paths a node install writes, in CRI-O's own mount namespace: each
// field, when set, is a directory of the test bound over that host path, so
// that CRI-O runs with its stock configuration and the host stays as it was.
type crioHosts struct {
	// hooksDir is bound at hooks.DefaultDir (/usr/share/containers/oci/hooks.d),
	// the only directory stock CRI-O reads hooks from (hooks_dir unset).
	hooksDir string
	// override is bound at hooks.OverrideDir (/etc/containers/oci/hooks.d),
	// which stock CRI-O does not read.
	override string
	// hookBin and config are bound at /opt/spiffe-oci-hook/bin and
	// /etc/spiffe-oci-hook, where the DaemonSet installs the hook and the
	// node config, for the hooks JSON exactly as the manifests ship it.
	hookBin, config string
}

// startCRIO starts CRI-O with its stock hooks configuration (no hooks_dir),
// the node's installed JSON being what it finds in its default hooks
// directory.
func startCRIO(t *testing.T, n *node) *runtime {
	t.Helper()
	return startCRIOWith(t, n, crioHosts{hooksDir: n.hooksDir})
}

// startCRIOWith starts CRI-O (test/crio) for node n with everything under
// a temp dir: its own containers-storage (the busybox and pause images
// imported there with podman), runc under cgroupfs, conmon in the pod's
// cgroup, no CNI (host-network pods run), NRI off, and no hooks_dir: CRI-O's
// default. CRI-O runs in a mount namespace of its own (unshare), where
// /usr/share, /etc and /opt are overlays whose writes stay in the temp dir
// and the directories of hosts are bound where a node install puts its
// files. internal_wipe and internal_repair are off and the version files
// live in the temp dir, so that CRI-O never decides to wipe a store.
func startCRIOWith(t *testing.T, n *node, hosts crioHosts) *runtime {
	t.Helper()
	dir := tempDir(t, "cri-crio-")
	root, runroot := filepath.Join(dir, "storage"), filepath.Join(dir, "runroot")
	podmanImport(t, dir, root, runroot)
	socket := filepath.Join(dir, "crio.sock")
	confPath, dropIn, err := criconf.CRIO{
		Dir: dir, Root: root, RunRoot: runroot, LogDir: filepath.Join(dir, "pods"),
		Socket: socket, Pinns: filepath.Join(toolDir, "pinns"), PauseImage: pauseImage,
		NetworkDir: filepath.Join(dir, "cni", "net.d"), PluginDir: filepath.Join(dir, "cni", "bin"),
	}.Write()
	if err != nil {
		t.Fatal(err)
	}
	// No drop-in: hooks_dir keeps CRI-O's default, hooks.DefaultDir.

	hostPathsUntouched(t, "CRI-O")
	log := filepath.Join(dir, "crio.log")
	logf, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("unshare", append([]string{"--mount", "--propagation", "private", "sh", "-euc", crioNamespaceScript(t, dir, hosts), "sh",
		filepath.Join(toolDir, "crio")}, "--config", confPath, "--config-dir", dropIn)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	r := newRuntime(t, "crio", n, dir, socket)
	// Container mounts live in CRI-O's mount namespace.
	r.mountinfo = fmt.Sprintf("/proc/%d/mountinfo", cmd.Process.Pid)
	t.Cleanup(func() {
		// Pods first (their poststop hooks), then CRI-O, then any conmon.
		if out, err := r.run("rmp", "-fa"); err != nil {
			t.Errorf("crictl rmp -fa: %v %s", err, out)
		}
		n.checkStateEmpty(t)
		if _, ok := stop(cmd, done, unix.SIGTERM, 30*time.Second); !ok {
			t.Errorf("CRI-O did not stop at SIGTERM")
		}
		if t.Failed() {
			t.Logf("crio log:\n%s", tail(log, 60))
		}
	})
	r.waitReady(t, done, log)
	return r
}

// waitReady waits until the runtime answers crictl version.
func (r *runtime) waitReady(t *testing.T, done <-chan struct{}, log string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := r.run("version"); err == nil {
			return
		}
		select {
		case <-done:
			t.Fatalf("%s exited at start:\n%s", r.name, tail(log, 40))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not answer on its socket:\n%s", r.name, tail(log, 40))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// crioNamespaceScript is the shell script that, in CRI-O's new mount
// namespace (private: nothing propagates to the host), lays out hosts and
// then execs CRI-O ("$@"). /usr/share, /etc and /opt become overlays with
// their upper layers in dir, so that the mount points created for hosts
// exist only there.
func crioNamespaceScript(t *testing.T, dir string, hosts crioHosts) string {
	t.Helper()
	var b strings.Builder
	for _, base := range []string{"/usr/share", "/etc", "/opt"} {
		up := filepath.Join(dir, "ns", strings.ReplaceAll(strings.Trim(base, "/"), "/", "-"))
		for _, d := range []string{"upper", "work"} {
			if err := os.MkdirAll(filepath.Join(up, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		fmt.Fprintf(&b, "mount -t overlay overlay -o lowerdir=%s,upperdir=%s/upper,workdir=%s/work %s\n", base, up, up, base)
	}
	for src, dst := range map[string]string{hosts.hooksDir: hooks.DefaultDir, hosts.override: hooks.OverrideDir, hosts.hookBin: "/opt/spiffe-oci-hook/bin", hosts.config: "/etc/spiffe-oci-hook"} {
		if src == "" {
			continue
		}
		fmt.Fprintf(&b, "mkdir -p %s\nmount --bind %s %s\n", dst, src, dst)
	}
	b.WriteString("exec \"$@\"\n")
	return b.String()
}
