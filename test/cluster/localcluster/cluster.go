// Package localcluster runs a one-node Kubernetes cluster on this host for
// the tests (test/cluster) and for `make cluster`: etcd, the API server,
// the controller manager, the scheduler and a kubelet (test/kubernetes),
// against CRI-O or containerd (test/crio, test/containerd) with a CNI
// bridge (test/cni), images built offline from the project's binaries and
// SPIRE's, and SPIRE deployed in the cluster (test/cluster/manifests).
//
// Everything it can place is under one directory; what a kubelet changes
// on a host anyway (sysctls, iptables chains, /var/lib/kubelet/device-plugins,
// /var/log/containers) and what the installed DaemonSets write to the host
// (the hook, its JSON, the state tmpfs, SPIRE's sockets) is recorded
// first and restored by Down, which then reports anything left (a leak).
//
// The process running it must be a child subreaper (BecomeSubreaper):
// conmon and the containerd shims daemonize, and PID 1 here does not reap.
package localcluster

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
)

// CgroupRoot is the kubelet's cgroupRoot: its own tree, not test/cri's
// /kubepods.
const CgroupRoot = "/spiffe-cluster"

// NodeName is the one node's name.
const NodeName = "spiffe-node"

// StateDir is the project's state directory on the host (the chart's
// hostPath); Up mounts a tmpfs there, since /run is no tmpfs here and keys
// never touch persistent disk.
const StateDir = "/run/spiffe-oci-hook"

// AgentHostDirs hold the SPIRE agent's sockets on the host (the
// manifests' hostPaths, SPIRE's Helm chart's paths): the admin and broker
// sockets' directories under AgentSocketsDir, and the Workload API's.
var AgentHostDirs = []string{AgentSocketsDir, WorkloadAPIDir}

// RuntimeStateDirs are the runtimes' state directories the DaemonSet's
// refresher mounts read-only, with HostToContainer propagation, for its
// audit (deploy/kubernetes/base/daemonset.yaml, host-run-* volumes).
var RuntimeStateDirs = []string{"/run/runc", "/run/crun", "/run/containers", "/run/containerd"}

// Options say where things are.
type Options struct {
	// Runtime is "crio" or "containerd".
	Runtime string
	// Dir holds everything of the cluster (short: unix socket paths).
	Dir string
	// RepoRoot is the project's checkout (deploy/, bin/).
	RepoRoot string
	// ToolDir holds the pinned binaries (bin/test: crio, containerd,
	// crictl, ctr, kube-*, kubelet, kubectl, etcd, helm,
	// spire-controller-manager; cni/).
	ToolDir string
	// SPIREBinDir holds spire-server and spire-agent SPIRE 1.15.3
	// (bin/test/spire-1.15); ToolDir holds spire-controller-manager.
	SPIREBinDir string
	// Log receives progress lines.
	Log io.Writer
	// SPIREInterval, when set, is both the server's cache_reload_interval
	// and the agent's sync_interval (experimental settings; SPIRE's
	// default is 5 s for each): how soon a new entry reaches the agent.
	// For make bench.
	SPIREInterval time.Duration
	// SpiffeHelperBin, when set, is a spiffe-helper binary that Up puts
	// into SpiffeHelperImage. For make bench.
	SpiffeHelperBin string
}

// Cluster is a running cluster.
type Cluster struct {
	Options
	NodeIP, NodeName string
	// Kubeconfig is the admin kubeconfig (system:masters).
	Kubeconfig    string
	RuntimeSocket string

	pki         *pki
	host        *hostState
	procs       []*proc
	runtimeProc *proc
	kubeletProc *proc
	stateMount  bool
	// sharedBinds are the self-bind mounts prepareHost made shared for
	// the refresher's HostToContainer mounts; Down undoes exactly these.
	sharedBinds []string
	// Timings of Up's steps, for reports.
	Timings []Timing
}

// Timing is how long one step of Up took.
type Timing struct {
	Step string
	Took time.Duration
}

func (c *Cluster) logf(format string, args ...any) {
	if c.Log != nil {
		fmt.Fprintf(c.Log, "cluster: "+format+"\n", args...)
	}
}

func (c *Cluster) step(name string, f func() error) error {
	start := time.Now()
	err := f()
	c.Timings = append(c.Timings, Timing{name, time.Since(start)})
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	c.logf("%s (%.1fs)", name, time.Since(start).Seconds())
	return nil
}

// Up starts the cluster with SPIRE running and its entries for the hook
// and the refresher registered, and returns once the node is Ready and
// the SPIRE agent is. On error the cluster is already torn down (its
// error joined with Up's).
func Up(opts Options) (*Cluster, error) {
	if opts.Runtime != "crio" && opts.Runtime != "containerd" {
		return nil, fmt.Errorf("runtime %q: want crio or containerd", opts.Runtime)
	}
	ip, err := nodeIP()
	if err != nil {
		return nil, err
	}
	c := &Cluster{Options: opts, NodeIP: ip, NodeName: NodeName}
	for _, d := range []string{"logs"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	if c.host, err = snapshotHost(CgroupRoot); err != nil {
		return nil, err
	}
	err = c.up()
	if err != nil {
		return nil, errors.Join(err, c.Down())
	}
	return c, nil
}

func (c *Cluster) up() error {
	steps := []struct {
		name string
		f    func() error
	}{
		{"host prepared", c.prepareHost},
		{"certificates", c.writePKI},
		{"runtime " + c.Runtime + " with images", func() error {
			if c.Runtime == "crio" {
				return c.startCRIO()
			}
			return c.startContainerd()
		}},
		{"control plane ready", c.startControlPlane},
		{"node Ready", c.startKubelet},
		{"SPIRE ready", c.deploySPIRE},
	}
	for _, s := range steps {
		if err := c.step(s.name, s.f); err != nil {
			return err
		}
	}
	return nil
}

// prepareHost mounts the tmpfs state directory and creates the kubelet's
// cgroup root in every hierarchy (the kubelet refuses a missing one).
func (c *Cluster) prepareHost() error {
	if err := os.MkdirAll(StateDir, 0o700); err != nil {
		return err
	}
	// Sized from the node's state budget, which the hook enforces, plus
	// half again for the generation a rotation writes before it removes
	// the oldest: what tenants make it hold is charged to the
	// refresher's memory (issue 24).
	size := fmt.Sprintf("mode=0700,size=%dm", config.DefaultStateBudgetMiB*3/2)
	if err := unix.Mount("tmpfs", StateDir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, size); err != nil {
		return fmt.Errorf("tmpfs on %s: %w", StateDir, err)
	}
	c.stateMount = true
	// The refresher mounts the state directory and the agent's socket
	// directories (admin or broker, and the Workload API's) with
	// HostToContainer propagation, which the runtimes refuse unless the
	// host mount is shared; here / is private (on a systemd host it is
	// shared). Each gets a shared mount of its own, undone by Down.
	for _, d := range AgentHostDirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(d, d, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount %s: %w", d, err)
		}
	}
	for _, d := range append([]string{StateDir}, AgentHostDirs...) {
		if err := unix.Mount("", d, "", unix.MS_SHARED, ""); err != nil {
			return fmt.Errorf("making %s a shared mount: %w", d, err)
		}
	}
	// The audit reads the runtimes' state through HostToContainer mounts
	// too (the DaemonSet's host-run-* volumes). A recursive self-bind keeps
	// whatever is mounted below them (a running Podman container's shm)
	// visible; Down detaches exactly these binds, never a mount another
	// program makes there meanwhile.
	for _, d := range RuntimeStateDirs {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
		if err := unix.Mount(d, d, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount %s: %w", d, err)
		}
		c.sharedBinds = append(c.sharedBinds, d)
		if err := unix.Mount("", d, "", unix.MS_SHARED, ""); err != nil {
			return fmt.Errorf("making %s a shared mount: %w", d, err)
		}
	}
	ents, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return err
	}
	for _, e := range ents {
		if e.Type()&os.ModeSymlink != 0 {
			continue // cpu -> cpu,cpuacct
		}
		base := filepath.Join("/sys/fs/cgroup", e.Name())
		if _, err := os.Stat(filepath.Join(base, "cgroup.procs")); err != nil {
			continue
		}
		d := filepath.Join(base, CgroupRoot)
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
		// cpuset: a new v1 cgroup starts with no cpus and mems.
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if v, err := os.ReadFile(filepath.Join(base, f)); err == nil {
				os.WriteFile(filepath.Join(d, f), v, 0o644)
			}
		}
	}
	return nil
}

// nodeIP is the address of the interface of the default route: the
// kubelet's node IP cannot be loopback (pods reach the API server there).
func nodeIP() (string, error) {
	out, err := exec.Command("ip", "-4", "route", "get", "1.1.1.1").Output()
	if err == nil {
		f := strings.Fields(string(out))
		for i := range f {
			if f[i] == "src" && i+1 < len(f) {
				return f[i+1], nil
			}
		}
	}
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && n.IP.IsGlobalUnicast() {
			return n.IP.String(), nil
		}
	}
	return "", errors.New("no non-loopback IPv4 address for the node")
}

// Kubectl runs kubectl as the admin.
func (c *Cluster) Kubectl(args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(c.ToolDir, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// KubectlStdin runs kubectl with stdin.
func (c *Cluster) KubectlStdin(stdin string, args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(c.ToolDir, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Helm runs helm against the cluster.
func (c *Cluster) Helm(args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(c.ToolDir, "helm"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+filepath.Join(c.Dir, "helm", "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(c.Dir, "helm", "config"), "HELM_DATA_HOME="+filepath.Join(c.Dir, "helm", "data"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("helm %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Down stops the cluster and restores the host: the kubelet first (so
// that nothing restarts pods), then every pod through the runtime (their
// poststop hooks run), the runtime, the control plane, whatever process
// is left (killed: a leak), then the host's state. It returns what went
// wrong, leaks included.
func (c *Cluster) Down() error {
	var errs []error
	if c.kubeletProc != nil {
		if err := c.kubeletProc.stop(30 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if c.runtimeProc != nil && !c.runtimeProc.exited() {
		if out, err := c.Crictl("rmp", "-fa"); err != nil {
			errs = append(errs, fmt.Errorf("crictl rmp -fa: %v: %s", err, out))
		}
	}
	for i := len(c.procs) - 1; i >= 0; i-- {
		if err := c.procs[i].stop(30 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if left := c.killOrphans(); len(left) > 0 {
		errs = append(errs, fmt.Errorf("processes outlived the cluster (killed): %q", left))
	}
	for i := len(c.sharedBinds) - 1; i >= 0; i-- {
		if err := unix.Unmount(c.sharedBinds[i], unix.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", c.sharedBinds[i], err))
		}
	}
	c.sharedBinds = nil
	if c.host != nil {
		if err := c.host.restore(c.Dir); err != nil {
			errs = append(errs, err)
		}
		if left := c.host.leaks(c.Dir); len(left) > 0 {
			errs = append(errs, fmt.Errorf("the cluster left on the host: %s", strings.Join(left, "; ")))
		}
	}
	return errors.Join(errs...)
}
