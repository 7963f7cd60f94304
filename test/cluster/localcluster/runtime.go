package localcluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// The CNI network: a bridge with host-local addresses, no masquerade and
// no port mapping, so that no iptables rule is added. isGateway gives pods
// a route to the node's address (the API server, the SPIRE server); the
// bridge plugin turns on net.ipv4.ip_forward for it, which Down restores.
const (
	cniBridge = "spiffecni0"
	podSubnet = "10.244.77.0/24"
)

func (c *Cluster) writeCNI(confDir string) error {
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		return err
	}
	conf := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "spiffe-cluster",
  "plugins": [
    {
      "type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": %q}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": %q
      }
    }
  ]
}
`, cniBridge, podSubnet, filepath.Join(c.Dir, "cni", "ipam"))
	return os.WriteFile(filepath.Join(confDir, "10-spiffe-cluster.conflist"), []byte(conf), 0o644)
}

// startCRIO starts CRI-O with its stock hooks configuration: no hooks_dir
// at all, so it reads /usr/share/containers/oci/hooks.d, as on a node
// where CRI-O was installed from a package. Its storage, state and
// sockets are under the cluster's directory; internal_wipe and
// internal_repair are off so that it never decides to wipe a store (the
// host's /var/lib/containers/storage is Podman's).
func (c *Cluster) startCRIO() error {
	dir := filepath.Join(c.Dir, "crio")
	root := filepath.Join(dir, "storage")
	for _, d := range []string{"exits", "attach", "ns", "runc", "logs"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	if err := c.buildImages(root); err != nil {
		return err
	}
	if err := c.writeCNI(filepath.Join(dir, "net.d")); err != nil {
		return err
	}
	os.WriteFile(filepath.Join(dir, "policy.json"), []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644)
	c.RuntimeSocket = filepath.Join(dir, "crio.sock")
	conf := fmt.Sprintf(`[crio]
root = %[1]q
runroot = "%[1]s-run"
storage_driver = "overlay"
log_dir = "%[2]s/logs"
version_file = "%[2]s/version"
version_file_persist = "%[2]s/version-persist"
clean_shutdown_file = "%[2]s/clean.shutdown"
internal_wipe = false
internal_repair = false

[crio.api]
listen = %[3]q
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
cgroup_manager = "cgroupfs"
container_exits_dir = "%[2]s/exits"
container_attach_socket_dir = "%[2]s/attach"
namespaces_dir = "%[2]s/ns"
pinns_path = %[4]q
decryption_keys_path = "%[2]s/keys"
irqbalance_config_file = "%[2]s/irqbalance"
irqbalance_config_restore_file = "%[2]s/orig_irq_banned_cpus"
enable_criu_support = false
# No CAP_SYS_RESOURCE here: no raised rlimits.
default_ulimits = []

[crio.runtime.runtimes.runc]
runtime_path = "/usr/sbin/runc"
runtime_type = "oci"
runtime_root = "%[2]s/runc"
monitor_path = "/usr/bin/conmon"
monitor_cgroup = "pod"

[crio.image]
pause_image = %[5]q
signature_policy = "%[2]s/policy.json"
signature_policy_dir = "%[2]s/policies"

[crio.network]
network_dir = "%[2]s/net.d"
plugin_dirs = [%[6]q]

[crio.metrics]
enable_metrics = false

[crio.nri]
enable_nri = false
`, root, dir, c.RuntimeSocket, filepath.Join(c.ToolDir, "pinns"), PauseImage, filepath.Join(c.ToolDir, "cni"))
	if strings.Contains(conf, "hooks_dir") {
		return fmt.Errorf("CRI-O config must keep the stock hooks_dir")
	}
	confPath := filepath.Join(dir, "crio.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return err
	}
	// An empty drop-in directory: the host's /etc/crio/crio.conf.d (if
	// any) is not read.
	os.MkdirAll(filepath.Join(dir, "crio.conf.d"), 0o755)
	p, err := c.start("crio", filepath.Join(c.ToolDir, "crio"), "--config", confPath, "--config-dir", filepath.Join(dir, "crio.conf.d"))
	if err != nil {
		return err
	}
	c.runtimeProc = p
	return c.waitRuntime(p)
}

// startContainerd starts containerd with every directory under the
// cluster's, the containerd-nri overlay's containerd-nri.toml imported as
// shipped (NRI on /var/run/nri/nri.sock, where the DaemonSet's nri
// container finds it), and the images imported with ctr.
func (c *Cluster) startContainerd() error {
	dir := filepath.Join(c.Dir, "containerd")
	for _, d := range []string{"root", "state", "tmp", "s", "runc", "nri/plugins", "nri/conf.d", "opt", "verifier"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	if err := c.writeCNI(filepath.Join(dir, "net.d")); err != nil {
		return err
	}
	nriToml := filepath.Join(c.RepoRoot, "deploy", "kubernetes", "overlays", "containerd-nri", "containerd-nri.toml")
	c.RuntimeSocket = filepath.Join(dir, "containerd.sock")
	conf := fmt.Sprintf(`version = 3
root = '%[1]s/root'
state = '%[1]s/state'
temp = '%[1]s/tmp'
imports = [%[2]q]

[grpc]
  address = %[3]q
[ttrpc]
  address = '%[3]s.ttrpc'
[debug]
  address = ''
[metrics]
  address = ''

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %[4]q
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = ''

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '/usr/sbin/runc'
        Root = '%[1]s/runc'
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [%[5]q]
    conf_dir = '%[1]s/net.d'

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'

[plugins.'io.containerd.nri.v1.nri']
  plugin_path = '%[1]s/nri/plugins'
  plugin_config_path = '%[1]s/nri/conf.d'

[plugins.'io.containerd.shim.v1.manager']
  socket_dir = '%[1]s/s'

[plugins.'io.containerd.internal.v1.opt']
  path = '%[1]s/opt'

[plugins.'io.containerd.image-verifier.v1.bindir']
  bin_dir = '%[1]s/verifier'
`, dir, nriToml, c.RuntimeSocket, PauseImage, filepath.Join(c.ToolDir, "cni"))
	confPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return err
	}
	// The NRI socket's directory: the overlay's nri container mounts it
	// with hostPath type Directory.
	os.MkdirAll("/var/run/nri", 0o755)
	p, err := c.start("containerd", filepath.Join(c.ToolDir, "containerd"), "--config", confPath)
	if err != nil {
		return err
	}
	c.runtimeProc = p
	if err := c.waitRuntime(p); err != nil {
		return err
	}
	store := filepath.Join(c.Dir, "podman")
	if err := c.buildImages(store); err != nil {
		return err
	}
	archive := filepath.Join(c.Dir, "images.tar")
	if err := c.podman(store, append([]string{"save", "--multi-image-archive", "-o", archive}, c.allImageNames()...)...); err != nil {
		return err
	}
	defer os.Remove(archive)
	out, err := exec.Command(filepath.Join(c.ToolDir, "ctr"), "--address", c.RuntimeSocket, "-n", "k8s.io", "images", "import", archive).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import: %v\n%s", err, out)
	}
	return nil
}

// waitRuntime waits until the runtime answers crictl version.
func (c *Cluster) waitRuntime(p *proc) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := c.Crictl("version"); err == nil {
			return nil
		}
		if p.exited() {
			return fmt.Errorf("%s exited at start:\n%s", p.name, Tail(p.log, 30))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not answer on its socket:\n%s", p.name, Tail(p.log, 30))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Crictl runs crictl against the cluster's runtime.
func (c *Cluster) Crictl(args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(c.ToolDir, "crictl"), append([]string{"--runtime-endpoint", "unix://" + c.RuntimeSocket, "--image-endpoint", "unix://" + c.RuntimeSocket, "--timeout", "30s"}, args...)...)
	return cmd.CombinedOutput()
}
