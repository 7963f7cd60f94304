package cluster

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/test/cluster/localcluster"
	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestClusterCRIO: CRI-O with its stock hooks configuration, the project
// installed with `helm install ... --set runtime=crio`.
func TestClusterCRIO(t *testing.T) { runCluster(t, "crio", crioLifecycle) }

// TestClusterContainerd: containerd with NRI (the containerd-nri
// overlay's toml), the project installed with `kubectl apply -k` of that
// overlay, unmodified.
func TestClusterContainerd(t *testing.T) { runCluster(t, "containerd", containerdLifecycle) }

// crioLifecycle installs with Helm. The upgrade also sets
// refresher_grace to uninstallGrace (nodeConfig), for the uninstall
// scenario.
var crioLifecycle = lifecycle{
	install: func(c *localcluster.Cluster) error { return c.InstallHelm() },
	upgrade: func(c *localcluster.Cluster) error {
		cfg, err := shortGraceConfig(c)
		if err != nil {
			return err
		}
		return c.UpgradeHelm("--set-file", "nodeConfig="+cfg)
	},
	uninstall: func(c *localcluster.Cluster) error { return c.UninstallHelm() },
}

// containerdOverlay is the kustomize overlay the containerd cluster
// applies, with the broker component.
const containerdOverlay = "overlays/containerd-nri"

var containerdLifecycle = lifecycle{
	install:   func(c *localcluster.Cluster) error { return c.InstallKustomize(containerdOverlay, "broker") },
	upgrade:   func(c *localcluster.Cluster) error { return c.UpgradeKustomize(containerdOverlay, "broker") },
	uninstall: func(c *localcluster.Cluster) error { return c.UninstallKustomize() },
}

// lifecycle is how one runtime's test installs, upgrades (to
// localcluster.UpgradeImage, not waiting for the rollout) and removes
// the project.
type lifecycle struct {
	install, upgrade, uninstall func(*localcluster.Cluster) error
}

// scenarios run in order on one cluster per runtime; Uninstall removes
// the project, so it goes last.
var scenarios = []struct {
	name string
	run  func(t *testing.T, e *env)
}{
	{"TwoNamespaces", twoNamespaces},
	{"NewPodsFirstAttempt", newPodsFirstAttempt},
	{"IgnoredNamespaceRefused", ignoredNamespaceRefused},
	{"LateRegistration", lateRegistration},
	{"PrintedExample", printedExample},
	{"AgentRestart", agentRestart},
	{"Upgrade", upgrade},
	{"Uninstall", uninstall},
}

// env is one runtime's cluster with the project installed.
type env struct {
	*localcluster.Cluster
	lifecycle
	// rotatingNS is set by twoNamespaces: a namespace whose pods rotate every
	// 30 s, for agentRestart.
	rotatingNS string
}

func runCluster(t *testing.T, runtime string, lc lifecycle) {
	e := startCluster(t, runtime, lc, localcluster.Options{})
	for _, s := range scenarios {
		if !t.Run(s.name, func(t *testing.T) { s.run(t, e) }) {
			break
		}
	}
	t.Logf("cluster: memory of the node's processes and pods: %s", memory(e.Cluster))
}

// startCluster brings up runtime's cluster, with extra's SPIREInterval and
// SpiffeHelperBin, and installs the project; the cluster goes down, and
// the host is restored, when t ends.
func startCluster(t *testing.T, runtime string, lc lifecycle, extra localcluster.Options) *env {
	testhelp.SkipShort(t, "cluster")
	spiretest.RequireRoot(t)
	testhelp.Installed(t, "cluster", "runc", "conmon", "podman", "iptables-save")
	root := testhelp.RepoRoot(t)
	toolDir := filepath.Join(root, "bin", "test")
	buildTools(t, root, toolDir, runtime)
	spireServer, _ := spiretest.Binaries(t)

	// Short: containerd refuses a shim socket_dir over 42 bytes.
	dir, err := os.MkdirTemp("/tmp", "spc-"+runtime[:4]+"-")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c, err := localcluster.Up(localcluster.Options{
		Runtime: runtime, Dir: dir, RepoRoot: root, ToolDir: toolDir,
		SPIREBinDir: filepath.Dir(spireServer), Log: testLog{t},
		SPIREInterval: extra.SPIREInterval, SpiffeHelperBin: extra.SpiffeHelperBin,
	})
	if err != nil {
		logs(t, dir)
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, l := range [][]string{
				{"-n", "spire", "logs", "daemonset/spire-agent", "--tail", "30"},
				{"-n", localcluster.ProjectNamespace, "logs", localcluster.ProjectDaemonSet, "--all-containers", "--tail", "30"},
				{"get", "pods", "-A", "-o", "wide"},
			} {
				out, _ := c.Kubectl(l...)
				t.Logf("kubectl %s:\n%s", strings.Join(l, " "), out)
			}
			logs(t, dir)
		}
		stop := time.Now()
		if err := c.Down(); err != nil {
			t.Error(err)
		}
		t.Logf("cluster: down and host restored in %.1fs", time.Since(stop).Seconds())
		os.RemoveAll(dir)
	})
	t.Logf("cluster: up in %.1fs", time.Since(start).Seconds())
	installStart := time.Now()
	if err := lc.install(c); err != nil {
		describe(t, c, localcluster.ProjectNamespace)
		t.Fatal(err)
	}
	t.Logf("cluster: spiffe-oci-hook DaemonSet Ready %.1fs after install", time.Since(installStart).Seconds())
	return &env{Cluster: c, lifecycle: lc}
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// buildTools builds (or finds up to date) every pinned program the cluster
// needs, one after the other, and the project's binaries.
func buildTools(t *testing.T, root, toolDir, runtime string) {
	t.Helper()
	scripts := [][]string{
		{"test/crictl/build.sh", toolDir},
		{"test/" + runtime + "/build.sh", toolDir},
		{"test/helm/build.sh", toolDir},
		{"test/kubernetes/build.sh", toolDir},
		{"test/cni/build.sh", filepath.Join(toolDir, "cni")},
		{"test/spire-controller-manager/build.sh", toolDir},
	}
	for _, s := range scripts {
		if out, err := exec.Command(filepath.Join(root, s[0]), s[1]).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", s[0], err, out)
		}
	}
	cmd := exec.Command("make", "-s", "build")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make build: %v\n%s", err, out)
	}
}

// logs prints the tail of every daemon's log.
func logs(t *testing.T, dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "logs", "*.log"))
	for _, f := range files {
		t.Logf("--- %s:\n%s", filepath.Base(f), localcluster.Tail(f, 25))
	}
}

// describe logs the pods and events of a namespace.
func describe(t *testing.T, c *localcluster.Cluster, ns string) {
	out, _ := c.Kubectl("-n", ns, "describe", "pods")
	t.Logf("kubectl -n %s describe pods:\n%s", ns, out)
}

// memory sums the resident memory of the cluster's processes (this test
// binary's descendants) and the pods' cgroup tree.
func memory(c *localcluster.Cluster) string {
	var rss int64
	parent := map[int]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(data)
		var state string
		var pp int
		fmt.Sscan(s[strings.LastIndexByte(s, ')')+1:], &state, &pp)
		parent[pid] = pp
	}
	self := os.Getpid()
	for pid := range parent {
		for p := parent[pid]; p > 1; p = parent[p] {
			if p == self {
				data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/statm", pid))
				var size, res int64
				fmt.Sscan(string(data), &size, &res)
				rss += res * int64(os.Getpagesize())
				break
			}
		}
	}
	pods := "?"
	if data, err := os.ReadFile("/sys/fs/cgroup/memory" + localcluster.CgroupRoot + "/memory.usage_in_bytes"); err == nil {
		var b int64
		fmt.Sscan(string(data), &b)
		pods = fmt.Sprintf("%d MiB", b>>20)
	}
	return fmt.Sprintf("processes (RSS sum, shared pages counted per process) %d MiB; pods' memory cgroup %s", rss>>20, pods)
}

// spiffeIDOf parses a pod's output: the line "SPIFFE ID: ..." its command
// printed from the delivered files, and the certificate it printed, whose
// URI SAN must say the same.
func spiffeIDOf(t *testing.T, out string) string {
	t.Helper()
	var printed string
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, "SPIFFE ID: "); ok {
			printed = strings.TrimSpace(v)
			break
		}
	}
	block, _ := pem.Decode([]byte(out[strings.Index(out, "-----BEGIN"):]))
	if printed == "" || block == nil {
		t.Fatalf("the pod printed no SPIFFE ID and certificate:\n%s", out)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	id, err := x509svid.IDFromCert(cert)
	if err != nil {
		t.Fatal(err)
	}
	if id.String() != printed {
		t.Fatalf("the pod printed %s, its certificate says %s", printed, id)
	}
	return printed
}

// certSerial parses a PEM certificate and returns its serial number,
// failing on an expired one.
func certSerial(t *testing.T, pemData []byte) string {
	t.Helper()
	block, _ := pem.Decode(pemData)
	if block == nil {
		t.Fatalf("no certificate in %q", pemData)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if time.Now().After(cert.NotAfter) {
		t.Fatalf("the delivered certificate expired at %s", cert.NotAfter)
	}
	return cert.SerialNumber.String()
}
