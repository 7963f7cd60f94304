package localcluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// TrustDomain is the manifests' trust domain.
const TrustDomain = "example.org"

// ClusterName is the k8s_psat cluster name (the SPIRE chart's
// clusterName): agents' SPIFFE IDs are
// spiffe://example.org/spire/agent/k8s_psat/local/<node UID>.
const ClusterName = "local"

// NodeAliasID is the node alias matching the cluster's k8s_psat agents
// (ClusterStaticEntry spire-spire-node-alias, manifests/delegates.yaml),
// the parent of the hook's entry in a kustomize install; spiffe-oci-hook's
// chart renders its own (ChartNodeAliasID).
const NodeAliasID = "spiffe://" + TrustDomain + "/k8s-node/" + ClusterName

// ChartNodeAliasID is the node alias spiffe-oci-hook's chart renders with
// registration.enabled for this trust domain and cluster.
const ChartNodeAliasID = "spiffe://" + TrustDomain + "/spiffe-oci-hook/node/" + ClusterName

// ClassName is spire-controller-manager's className, the SPIRE chart's
// default for release "spire" in namespace "spire". The controller also
// honours objects without className (watchClassless).
const ClassName = "spire-spire"

// DefaultClusterSPIFFEID is the chart's default ClusterSPIFFEID
// (spiffe://example.org/ns/<ns>/sa/<sa> for every pod outside the spire
// namespace and the controller's ignoreNamespaces). A namespace labelled
// NoDefaultIdentityLabel=false is left out of it.
const DefaultClusterSPIFFEID = "spire-spire-default"

// NoDefaultIdentityLabel, set to "false" on a namespace, keeps the
// default ClusterSPIFFEID from selecting it.
const NoDefaultIdentityLabel = "spiffe-oci-hook.test/default-identity"

// spiffe-oci-hook-direct as the DaemonSet installs it on the host (the
// hook runs it when no refresher takes a container over), and the
// refresher in the project image: the agent authorizes them as delegates
// (and the refresher as a broker) by these SPIFFE IDs.
const (
	HookDirectPath = "/opt/spiffe-oci-hook/bin/spiffe-oci-hook-direct"
	RefresherPath  = "/usr/bin/spiffe-oci-refresher"
	HookID         = "spiffe://" + TrustDomain + "/spiffe-oci-hook"
	RefresherID    = "spiffe://" + TrustDomain + "/spiffe-oci-refresher"
)

// The SPIRE agent's sockets on the host, where SPIRE's Helm chart puts
// them: sockets.hostBasePath with sockets.admin.mountOnHost and
// sockets.broker.mountOnHost, and socketPath.
const (
	AgentSocketsDir   = "/run/spire/agent/sockets"
	AgentAdminSocket  = AgentSocketsDir + "/csi.spiffe.io/admin/admin.sock"
	AgentBrokerSocket = AgentSocketsDir + "/csi.spiffe.io/broker/broker.sock"
	WorkloadAPIDir    = "/run/spire/agent-sockets"
	WorkloadAPISocket = WorkloadAPIDir + "/spire-agent.sock"
)

func (c *Cluster) manifest(name string) (string, error) {
	data, err := os.ReadFile(filepath.Join(c.RepoRoot, "test", "cluster", "manifests", name))
	if err != nil {
		return "", err
	}
	return strings.NewReplacer("NODE_IP", c.NodeIP, "SPIRE_IMAGE", SPIREImage).Replace(string(data)), nil
}

// SPIREManifests renders test/cluster/manifests/spire.yaml for this node,
// with SPIREInterval if set.
func (c *Cluster) SPIREManifests() (string, error) {
	m, err := c.manifest("spire.yaml")
	if err != nil || c.SPIREInterval == 0 {
		return m, err
	}
	return withIntervals(m, c.SPIREInterval)
}

// withIntervals sets the server's cache_reload_interval and the agent's
// sync_interval in spire.yaml's configs to d; an error if either config
// is not laid out as expected (nothing set silently).
func withIntervals(m string, d time.Duration) (string, error) {
	server := "      default_x509_svid_ttl = \"1h\"\n"
	agent := "      experimental {\n        # sockets.broker.enabled"
	if strings.Count(m, server) != 1 || strings.Count(m, agent) != 1 {
		return "", fmt.Errorf("spire.yaml: the server's or the agent's config is not laid out as expected: cannot set the intervals to %s", d)
	}
	m = strings.Replace(m, server, server+fmt.Sprintf("      experimental {\n        cache_reload_interval = %q\n      }\n", d.String()), 1)
	return strings.Replace(m, agent, fmt.Sprintf("      experimental {\n        sync_interval = %q\n        # sockets.broker.enabled", d.String()), 1), nil
}

// ControllerCRDDir is spire-controller-manager's config/crd/bases in the
// module cache, from the module test/spire-controller-manager pins.
func (c *Cluster) ControllerCRDDir() (string, error) {
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/spiffe/spire-controller-manager")
	cmd.Dir = filepath.Join(c.RepoRoot, "test", "spire-controller-manager")
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go list -m github.com/spiffe/spire-controller-manager in test/spire-controller-manager: %w", err)
	}
	dir := filepath.Join(strings.TrimSpace(string(out)), "config", "crd", "bases")
	if _, err := os.Stat(dir); err != nil {
		return "", err
	}
	return dir, nil
}

// deploySPIRE applies spire-controller-manager's CRDs, the server with
// the controller beside it, the registrations (manifests/registration.yaml)
// and the agent, and waits until the hook's entry exists on the server.
func (c *Cluster) deploySPIRE() error {
	crds, err := c.ControllerCRDDir()
	if err != nil {
		return err
	}
	if _, err := c.Kubectl("apply", "-f", crds); err != nil {
		return err
	}
	if _, err := c.Kubectl("wait", "--for=condition=Established", "--timeout=60s",
		"crd/clusterspiffeids.spire.spiffe.io", "crd/clusterstaticentries.spire.spiffe.io",
		"crd/clusterfederatedtrustdomains.spire.spiffe.io"); err != nil {
		return err
	}
	m, err := c.SPIREManifests()
	if err != nil {
		return err
	}
	// The agent's DaemonSet last, once the server has published the
	// trust bundle: an agent started before would crash-loop (and back
	// off) until the bundle appears in its ConfigMap volume.
	var server, agent []string
	for _, doc := range strings.Split(m, "\n---\n") {
		if strings.Contains(doc, "\nkind: DaemonSet\n") {
			agent = append(agent, doc)
		} else {
			server = append(server, doc)
		}
	}
	if _, err := c.KubectlStdin(strings.Join(server, "\n---\n"), "apply", "-f", "-"); err != nil {
		return err
	}
	if err := c.Rollout("spire", "statefulset/spire-server", 3*time.Minute); err != nil {
		return err
	}
	deadline := time.Now().Add(time.Minute)
	for {
		out, err := c.Kubectl("-n", "spire", "get", "configmap", "spire-bundle", "-o", "jsonpath={.data.bundle\\.crt}")
		if err == nil && strings.Contains(string(out), "BEGIN CERTIFICATE") {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the SPIRE server published no bundle in ConfigMap spire/spire-bundle: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	reg, err := c.manifest("registration.yaml")
	if err != nil {
		return err
	}
	if _, err := c.KubectlStdin(reg, "apply", "-f", "-"); err != nil {
		return err
	}
	if _, err := c.KubectlStdin(strings.Join(agent, "\n---\n"), "apply", "-f", "-"); err != nil {
		return err
	}
	return c.Rollout("spire", "daemonset/spire-agent", 3*time.Minute)
}

// waitHookEntry waits for the hook's entry, which spire-controller-manager
// writes from the install's ClusterStaticEntry, so that the first
// annotated pod finds the hook authorized.
func (c *Cluster) waitHookEntry() error {
	return c.WaitEntry(HookID, 2*time.Minute)
}

// WaitEntry waits until the SPIRE server holds an entry for spiffeID
// (which spire-controller-manager writes; read with entry show).
func (c *Cluster) WaitEntry(spiffeID string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		out, err := c.SPIREServer("entry", "show", "-spiffeID", spiffeID)
		if err == nil && strings.Contains(string(out), "Entry ID") {
			return nil
		}
		if time.Now().After(deadline) {
			logs, _ := c.Kubectl("-n", "spire", "logs", "spire-server-0", "-c", "spire-controller-manager", "--tail", "20")
			return fmt.Errorf("no entry for %s on the SPIRE server after %s (%v: %s); spire-controller-manager:\n%s", spiffeID, d, err, out, logs)
		}
		time.Sleep(time.Second)
	}
}

// Rollout waits for a workload's rollout.
func (c *Cluster) Rollout(ns, what string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		// rollout status fails at once while the object has no status.
		_, err := c.Kubectl("-n", ns, "rollout", "status", what, "--timeout", "30s")
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			pods, _ := c.Kubectl("-n", ns, "get", "pods", "-o", "wide")
			ev, _ := c.Kubectl("-n", ns, "get", "events", "--sort-by", ".lastTimestamp")
			// What a crash-looping container said, this run and the last.
			logs, _ := c.Kubectl("-n", ns, "logs", what, "--all-containers", "--prefix", "--tail", "15")
			prev, _ := c.Kubectl("-n", ns, "logs", what, "--all-containers", "--prefix", "--previous", "--tail", "15")
			return fmt.Errorf("%s/%s did not roll out: %w\n%s\n%s\nlogs:\n%s\nprevious logs:\n%s", ns, what, err, pods, lastLines(string(ev), 20), logs, prev)
		}
		time.Sleep(time.Second)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// SPIREServer runs the spire-server CLI in the server's pod (to read,
// never to register: registration goes through the controller).
func (c *Cluster) SPIREServer(args ...string) ([]byte, error) {
	return c.Kubectl(append([]string{"-n", "spire", "exec", "spire-server-0", "-c", "spire-server", "--", "spire-server"}, args...)...)
}

// ClusterSPIFFEID is a ClusterSPIFFEID that registers the pods of one
// namespace and service account as spiffe://example.org/ns/<ns>/sa/<sa>:
// the controller writes one entry per pod of the namespace (selectors
// k8s:pod-uid and, from workloadSelectorTemplates, k8s:sa, so that only
// that service account's pods match), parented to its node's agent. ttl
// 0 leaves the server's default X.509-SVID TTL. No className: the
// controller honours it (watchClassless).
func ClusterSPIFFEID(name, ns, sa string, ttl time.Duration) string {
	y := fmt.Sprintf(`apiVersion: spire.spiffe.io/v1alpha1
kind: ClusterSPIFFEID
metadata:
  name: %s
spec:
  spiffeIDTemplate: "spiffe://{{ .TrustDomain }}/ns/%s/sa/%s"
  namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: %s
  workloadSelectorTemplates:
  - "k8s:sa:%s"
`, name, ns, sa, ns, sa)
	if ttl > 0 {
		y += fmt.Sprintf("  ttl: %s\n", ttl)
	}
	return y
}

// RegisterCommand is the copy-paste command make cluster prints: kubectl
// apply of ClusterSPIFFEID for ns and sa, as a here-document.
func RegisterCommand(kubectl, ns, sa string) string {
	return kubectl + " apply -f - <<'YAML'\n" + ClusterSPIFFEID(ns+"-"+sa, ns, sa, 0) + "YAML"
}

// ReadyText is what make cluster prints once the cluster is up (took
// after Up began) with the project installed by InstallHelm: env (the
// export lines), the busybox image, and how workloads are registered,
// with a ClusterSPIFFEID to apply as printed.
func (c *Cluster) ReadyText(took time.Duration, env string) string {
	lines := []string{
		fmt.Sprintf("cluster: up in %.0fs (runtime %s, node %s at %s); spiffe-oci-hook installed with helm (runtime=%s)", took.Seconds(), c.Runtime, c.NodeName, c.NodeIP, c.HelmFlavour()),
		"",
		"  " + strings.ReplaceAll(strings.TrimSpace(env), "\n", "\n  "),
		"",
		"  busybox image for pods (imagePullPolicy: Never): " + BusyboxImage,
		"",
		"  SPIRE " + SPIREVersion + " as SPIRE's Helm chart runs it, with spire-controller-manager: every pod outside",
		"  kube-system, kube-public and spire gets spiffe://" + TrustDomain + "/ns/<namespace>/sa/<service account>",
		"  (ClusterSPIFFEID " + DefaultClusterSPIFFEID + "). Register a namespace and service account yourself",
		"  (here default/default; your own ClusterSPIFFEID takes precedence over the default one):",
		"",
		RegisterCommand("kubectl", "default", "default"),
		"",
		"  logs: " + filepath.Join(c.Dir, "logs") + "; stop and restore the host: make cluster-down",
	}
	return strings.Join(lines, "\n") + "\n"
}
