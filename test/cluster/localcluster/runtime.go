package localcluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/criconf"
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
	if err := c.buildImages(root); err != nil {
		return err
	}
	c.RuntimeSocket = filepath.Join(dir, "crio.sock")
	conf := criconf.CRIO{
		Dir: dir, Root: root, RunRoot: root + "-run", LogDir: filepath.Join(dir, "logs"),
		Socket: c.RuntimeSocket, Pinns: filepath.Join(c.ToolDir, "pinns"), PauseImage: PauseImage,
		NetworkDir: filepath.Join(dir, "net.d"), PluginDir: filepath.Join(c.ToolDir, "cni"),
	}
	confPath, dropIn, err := conf.Write()
	if err != nil {
		return err
	}
	if err := c.writeCNI(conf.NetworkDir); err != nil {
		return err
	}
	p, err := c.start("crio", filepath.Join(c.ToolDir, "crio"), "--config", confPath, "--config-dir", dropIn)
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
	c.RuntimeSocket = filepath.Join(dir, "containerd.sock")
	conf := criconf.Containerd{
		Dir: dir, Socket: c.RuntimeSocket, PauseImage: PauseImage,
		Imports:   []string{filepath.Join(c.RepoRoot, "deploy", "kubernetes", "overlays", "containerd-nri", "containerd-nri.toml")},
		CNIBinDir: filepath.Join(c.ToolDir, "cni"), CNIConfDir: filepath.Join(dir, "net.d"),
	}
	confPath, err := conf.Write()
	if err != nil {
		return err
	}
	if err := c.writeCNI(conf.CNIConfDir); err != nil {
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
