package cri

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gopkg.in/yaml.v3"
)

// startCRIO starts CRI-O (test/crio) for node n with everything under a
// temp dir: its own containers-storage (the busybox and pause images
// imported there with podman), runc under cgroupfs, conmon in the pod's
// cgroup, no CNI (host-network pods run), NRI off, and hooks_dir from the
// OpenShift overlay's drop-in, rooted at the node's directory. The hook
// JSON is there as make install put it (node.install). internal_wipe and
// internal_repair are off and the version files live in the temp dir, so
// that CRI-O never decides to wipe a store.
func startCRIO(t *testing.T, n *node) *runtime {
	t.Helper()
	dir := tempDir(t, "cri-crio-")
	root, runroot := filepath.Join(dir, "storage"), filepath.Join(dir, "runroot")
	podmanImport(t, dir, root, runroot)
	for _, d := range []string{"exits", "attach", "ns", "runc", "cni/net.d", "cni/bin", "crio.conf.d", "pods"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	os.WriteFile(filepath.Join(dir, "policy.json"), []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644)
	socket := filepath.Join(dir, "crio.sock")
	conf := fmt.Sprintf(`[crio]
root = %[1]q
runroot = %[2]q
storage_driver = "overlay"
log_dir = "%[3]s/pods"
version_file = "%[3]s/version"
version_file_persist = "%[3]s/version-persist"
clean_shutdown_file = "%[3]s/clean.shutdown"
internal_wipe = false
internal_repair = false

[crio.api]
listen = %[4]q
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
cgroup_manager = "cgroupfs"
container_exits_dir = "%[3]s/exits"
container_attach_socket_dir = "%[3]s/attach"
namespaces_dir = "%[3]s/ns"
pinns_path = %[5]q
decryption_keys_path = "%[3]s/keys"
irqbalance_config_file = "%[3]s/irqbalance"
irqbalance_config_restore_file = "%[3]s/orig_irq_banned_cpus"
enable_criu_support = false
# No CAP_SYS_RESOURCE here: no raised rlimits.
default_ulimits = []

[crio.runtime.runtimes.runc]
runtime_path = "/usr/sbin/runc"
runtime_type = "oci"
runtime_root = "%[3]s/runc"
monitor_path = "/usr/bin/conmon"
monitor_cgroup = "pod"

[crio.image]
pause_image = %[6]q
signature_policy = "%[3]s/policy.json"
signature_policy_dir = "%[3]s/policies"

[crio.network]
network_dir = "%[3]s/cni/net.d"
plugin_dirs = ["%[3]s/cni/bin"]

[crio.metrics]
enable_metrics = false

[crio.nri]
enable_nri = false
`, root, runroot, dir, socket, filepath.Join(toolDir, "pinns"), pauseImage)
	confPath := filepath.Join(dir, "crio.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	// The operator's drop-in: hooks_dir, exactly as the OpenShift overlay
	// ships it, with its paths under the node's directory.
	if err := os.WriteFile(filepath.Join(dir, "crio.conf.d", "99-spiffe-oci-hook.conf"), []byte(openshiftDropIn(t, n.dir)), 0o644); err != nil {
		t.Fatal(err)
	}

	hostPathsUntouched(t, "CRI-O")
	log := filepath.Join(dir, "crio.log")
	logf, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(toolDir, "crio"), "--config", confPath, "--config-dir", filepath.Join(dir, "crio.conf.d"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	r := newRuntime(t, "crio", n, dir, socket)
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

// openshiftDropIn returns the CRI-O drop-in of the OpenShift overlay
// (deploy/kubernetes/overlays/openshift/crio-dropin.yaml) with every
// absolute path in it placed under root.
func openshiftDropIn(t *testing.T, root string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "kubernetes", "overlays", "openshift", "crio-dropin.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	if err := yaml.Unmarshal(data, &cm); err != nil {
		t.Fatal(err)
	}
	conf, ok := cm.Data["99-spiffe-oci-hook.conf"]
	if !ok || !strings.Contains(conf, "hooks_dir") {
		t.Fatalf("crio-dropin.yaml holds no 99-spiffe-oci-hook.conf with hooks_dir: %q", conf)
	}
	return rootPaths(conf, root)
}
