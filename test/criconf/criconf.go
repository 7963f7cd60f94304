// Package criconf writes the configurations CRI-O and containerd run with
// in tests, one for test/cri and test/cluster alike, so that the two
// suites' runtimes cannot drift apart: everything of the runtime's under
// one directory, runc under cgroupfs, no raised rlimits and
// restrict_oom_score_adj (this machine has no CAP_SYS_RESOURCE), NRI as
// each suite needs it, and nothing that could make a runtime wipe a
// store (the host's /var/lib/containers/storage is Podman's).
package criconf

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// CRIO is CRI-O's configuration. hooks_dir stays unset: CRI-O reads its
// stock /usr/share/containers/oci/hooks.d, as on a node where it was
// installed from a package.
type CRIO struct {
	// Dir holds CRI-O's state: exits, attach sockets, namespaces, runc's
	// root, the signature policy and the version files.
	Dir string
	// Root and RunRoot are its containers-storage.
	Root, RunRoot string
	// LogDir holds the pods' logs.
	LogDir string
	Socket string
	// Pinns is test/crio's pinns.
	Pinns      string
	PauseImage string
	// NetworkDir and PluginDir are CNI's configuration and plugins.
	NetworkDir, PluginDir string
}

// Write creates Dir's directories and writes crio.conf, the signature
// policy and an empty drop-in directory (so that the host's
// /etc/crio/crio.conf.d is not read); it returns the paths to pass as
// --config and --config-dir.
func (c CRIO) Write() (conf, dropIn string, err error) {
	dirs := []string{c.LogDir, c.NetworkDir, c.PluginDir}
	for _, d := range []string{"exits", "attach", "ns", "runc", "crio.conf.d"} {
		dirs = append(dirs, filepath.Join(c.Dir, d))
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", "", err
		}
	}
	if err := os.WriteFile(filepath.Join(c.Dir, "policy.json"), []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644); err != nil {
		return "", "", err
	}
	text := fmt.Sprintf(`[crio]
root = %[1]q
runroot = %[2]q
storage_driver = "overlay"
log_dir = %[3]q
version_file = "%[4]s/version"
version_file_persist = "%[4]s/version-persist"
clean_shutdown_file = "%[4]s/clean.shutdown"
internal_wipe = false
internal_repair = false

[crio.api]
listen = %[5]q
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
cgroup_manager = "cgroupfs"
container_exits_dir = "%[4]s/exits"
container_attach_socket_dir = "%[4]s/attach"
namespaces_dir = "%[4]s/ns"
pinns_path = %[6]q
decryption_keys_path = "%[4]s/keys"
irqbalance_config_file = "%[4]s/irqbalance"
irqbalance_config_restore_file = "%[4]s/orig_irq_banned_cpus"
enable_criu_support = false
# No CAP_SYS_RESOURCE here: no raised rlimits.
default_ulimits = []

[crio.runtime.runtimes.runc]
runtime_path = "/usr/sbin/runc"
runtime_type = "oci"
runtime_root = "%[4]s/runc"
monitor_path = "/usr/bin/conmon"
monitor_cgroup = "pod"

[crio.image]
pause_image = %[7]q
signature_policy = "%[4]s/policy.json"
signature_policy_dir = "%[4]s/policies"

[crio.network]
network_dir = %[8]q
plugin_dirs = [%[9]q]

[crio.metrics]
enable_metrics = false

[crio.nri]
enable_nri = false
`, c.Root, c.RunRoot, c.LogDir, c.Dir, c.Socket, c.Pinns, c.PauseImage, c.NetworkDir, c.PluginDir)
	if strings.Contains(text, "hooks_dir") {
		return "", "", fmt.Errorf("CRI-O's test config must keep the stock hooks_dir")
	}
	conf = filepath.Join(c.Dir, "crio.conf")
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		return "", "", err
	}
	return conf, filepath.Join(c.Dir, "crio.conf.d"), nil
}

// Containerd is containerd's configuration (version 3).
type Containerd struct {
	// Dir holds root, state, temp, the shims' sockets, runc's root, NRI's
	// plugin directories, opt and the image verifiers' directory.
	Dir    string
	Socket string
	// Imports are configuration files containerd imports: the
	// containerd-nri overlay's containerd-nri.toml.
	Imports    []string
	PauseImage string
	// CNIBinDir and CNIConfDir are CNI's plugins and configuration.
	CNIBinDir, CNIConfDir string
}

// Write creates Dir's directories and writes config.toml; it returns its
// path, for --config.
func (c Containerd) Write() (string, error) {
	for _, d := range []string{"root", "state", "tmp", "s", "runc", "nri/plugins", "nri/conf.d", "opt", "verifier"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o755); err != nil {
			return "", err
		}
	}
	for _, d := range []string{c.CNIBinDir, c.CNIConfDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	var imports []string
	for _, i := range c.Imports {
		imports = append(imports, fmt.Sprintf("%q", i))
	}
	text := fmt.Sprintf(`version = 3
root = '%[1]s/root'
state = '%[1]s/state'
temp = '%[1]s/tmp'
imports = [%[2]s]

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
    conf_dir = %[6]q

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
`, c.Dir, strings.Join(imports, ", "), c.Socket, c.PauseImage, c.CNIBinDir, c.CNIConfDir)
	conf := filepath.Join(c.Dir, "config.toml")
	return conf, os.WriteFile(conf, []byte(text), 0o644)
}
