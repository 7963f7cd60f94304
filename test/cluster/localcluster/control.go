package localcluster

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Ports on the host. The API server listens on the node's address; etcd
// on loopback ports away from etcd's defaults; the controller manager and
// the scheduler serve nothing (secure-port 0).
const (
	apiPort      = 6443
	etcdPort     = 23790
	etcdPeerPort = 23800
	// kubeletPort is the kubelet's default secure port: the SPIRE agent's
	// k8s attestor asks it at 127.0.0.1.
	kubeletPort = 10250
)

// APIServer is the API server's URL.
func (c *Cluster) APIServer() string { return fmt.Sprintf("https://%s:%d", c.NodeIP, apiPort) }

func (c *Cluster) startControlPlane() error {
	bin := func(n string) string { return filepath.Join(c.ToolDir, n) }
	if _, err := c.start("etcd", bin("etcd"),
		"--name", "local", "--data-dir", filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPort),
		"--advertise-client-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPort),
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPeerPort),
		"--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPeerPort),
		"--initial-cluster", fmt.Sprintf("local=http://127.0.0.1:%d", etcdPeerPort),
		"--log-level", "warn"); err != nil {
		return err
	}
	pki := c.pki.path
	api, err := c.start("kube-apiserver", bin("kube-apiserver"),
		"--etcd-servers", fmt.Sprintf("http://127.0.0.1:%d", etcdPort),
		"--bind-address", c.NodeIP, "--advertise-address", c.NodeIP, "--secure-port", fmt.Sprint(apiPort),
		"--tls-cert-file", pki("apiserver.crt"), "--tls-private-key-file", pki("apiserver.key"),
		"--client-ca-file", pki("ca.crt"),
		"--kubelet-client-certificate", pki("admin.crt"), "--kubelet-client-key", pki("admin.key"),
		"--kubelet-certificate-authority", pki("ca.crt"),
		// The node's address is in the kubelet's certificate; its name
		// resolves nowhere.
		"--kubelet-preferred-address-types", "InternalIP",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", pki("sa.pub"), "--service-account-signing-key-file", pki("sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--authorization-mode", "Node,RBAC",
		"--allow-privileged=true",
		"--profiling=false", "--v", "1")
	if err != nil {
		return err
	}
	if err := c.waitHTTPS(api, "/readyz", 90*time.Second); err != nil {
		return err
	}
	if _, err := c.start("kube-controller-manager", bin("kube-controller-manager"),
		"--kubeconfig", c.Kubeconfig, "--authentication-kubeconfig", c.Kubeconfig, "--authorization-kubeconfig", c.Kubeconfig,
		"--secure-port", "0", "--leader-elect=false",
		"--service-account-private-key-file", pki("sa.key"), "--root-ca-file", pki("ca.crt"),
		"--cluster-signing-cert-file", pki("ca.crt"), "--cluster-signing-key-file", pki("ca.key"),
		"--profiling=false", "--v", "1"); err != nil {
		return err
	}
	if _, err := c.start("kube-scheduler", bin("kube-scheduler"),
		"--kubeconfig", c.Kubeconfig, "--authentication-kubeconfig", c.Kubeconfig, "--authorization-kubeconfig", c.Kubeconfig,
		"--secure-port", "0", "--leader-elect=false", "--profiling=false", "--v", "1"); err != nil {
		return err
	}
	return nil
}

// waitHTTPS polls path on the API server (as admin) until it answers 200.
func (c *Cluster) waitHTTPS(p *proc, path string, d time.Duration) error {
	ca, err := os.ReadFile(c.pki.path("ca.crt"))
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	cert, err := tls.LoadX509KeyPair(c.pki.path("admin.crt"), c.pki.path("admin.key"))
	if err != nil {
		return err
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}}}
	deadline := time.Now().Add(d)
	for {
		resp, err := client.Get(c.APIServer() + path)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if p.exited() {
			return fmt.Errorf("%s exited:\n%s", p.name, Tail(p.log, 30))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %s not ready after %s:\n%s", p.name, path, d, Tail(p.log, 30))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// startKubelet starts the kubelet with its own cgroupRoot (test/cri's
// stand-in uses /kubepods, and a kubelet owning a tree kills pods it does
// not know), no iptables utility chains, cgroup v1 allowed, and every
// directory it can be given under the cluster's.
func (c *Cluster) startKubelet() error {
	dir := filepath.Join(c.Dir, "kubelet")
	for _, d := range []string{"root", "pod-logs", "volume-plugins"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	conf := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[1]q}
authorization:
  mode: Webhook
address: 0.0.0.0
port: %[8]d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 0
tlsCertFile: %[2]q
tlsPrivateKeyFile: %[3]q
cgroupDriver: cgroupfs
cgroupRoot: %[4]q
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
failCgroupV1: false
failSwapOn: false
makeIPTablesUtilChains: false
protectKernelDefaults: false
containerRuntimeEndpoint: unix://%[5]s
podLogsDir: %[6]q
volumePluginDir: %[7]q
resolvConf: ""
clusterDomain: cluster.local
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%%"
  imagefs.available: "1%%"
  nodefs.inodesFree: "1%%"
evictionPressureTransitionPeriod: 10s
kernelMemcgNotification: false
shutdownGracePeriod: 0s
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
`, c.pki.path("ca.crt"), c.pki.path("kubelet.crt"), c.pki.path("kubelet.key"), CgroupRoot,
		c.RuntimeSocket, filepath.Join(dir, "pod-logs"), filepath.Join(dir, "volume-plugins"), kubeletPort)
	confPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return err
	}
	p, err := c.start("kubelet", filepath.Join(c.ToolDir, "kubelet"),
		"--config", confPath, "--kubeconfig", filepath.Join(c.Dir, "kubelet.kubeconfig"),
		"--root-dir", filepath.Join(dir, "root"), "--cert-dir", filepath.Join(dir, "pki"),
		"--hostname-override", c.NodeName, "--node-ip", c.NodeIP, "--v", "1")
	if err != nil {
		return err
	}
	c.kubeletProc = p
	deadline := time.Now().Add(120 * time.Second)
	for {
		out, err := c.Kubectl("get", "node", c.NodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err == nil && strings.TrimSpace(string(out)) == "True" {
			return nil
		}
		if p.exited() {
			return fmt.Errorf("kubelet exited:\n%s", Tail(p.log, 40))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("node %s not Ready after 2m (%s):\n%s", c.NodeName, out, Tail(p.log, 40))
		}
		time.Sleep(500 * time.Millisecond)
	}
}
