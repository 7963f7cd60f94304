package localcluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// TrustDomain is the manifests' trust domain.
const TrustDomain = "example.org"

// NodeAliasID is the parent of every entry: a node alias matching the
// cluster's k8s_psat agents, the usual way to register workloads of any
// node.
const NodeAliasID = "spiffe://" + TrustDomain + "/k8s-node/local"

// The hook as the DaemonSet installs it on the host, and the refresher in
// the project image: the agent authorizes them as delegates by these
// paths (unix:path) and uid 0.
const (
	HookPath      = "/opt/spiffe-oci-hook/bin/spiffe-oci-hook"
	RefresherPath = "/usr/bin/spiffe-oci-refresher"
	HookID        = "spiffe://" + TrustDomain + "/spiffe-oci-hook"
	RefresherID   = "spiffe://" + TrustDomain + "/spiffe-oci-refresher"
)

// SPIREManifests renders test/cluster/manifests/spire.yaml for this node.
func (c *Cluster) SPIREManifests() (string, error) {
	data, err := os.ReadFile(filepath.Join(c.RepoRoot, "test", "cluster", "manifests", "spire.yaml"))
	if err != nil {
		return "", err
	}
	return strings.NewReplacer("NODE_IP", c.NodeIP, "SPIRE_IMAGE", SPIREImage).Replace(string(data)), nil
}

// deploySPIRE applies the manifests, registers the node alias and the
// delegates' entries once the server is ready, and waits for the agent.
func (c *Cluster) deploySPIRE() error {
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
	if _, err := c.KubectlStdin(strings.Join(agent, "\n---\n"), "apply", "-f", "-"); err != nil {
		return err
	}
	if _, err := c.SPIREServer("entry", "create", "-node", "-spiffeID", NodeAliasID, "-selector", "k8s_psat:cluster:local"); err != nil {
		return err
	}
	if _, err := c.CreateEntry(HookID, "unix:uid:0", "unix:path:"+HookPath); err != nil {
		return err
	}
	if _, err := c.CreateEntry(RefresherID, "unix:uid:0", "unix:path:"+RefresherPath); err != nil {
		return err
	}
	return c.Rollout("spire", "daemonset/spire-agent", 3*time.Minute)
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
			return fmt.Errorf("%s/%s did not roll out: %w\n%s\n%s", ns, what, err, pods, lastLines(string(ev), 20))
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

// SPIREServer runs the spire-server CLI in the server's pod.
func (c *Cluster) SPIREServer(args ...string) ([]byte, error) {
	return c.Kubectl(append([]string{"-n", "spire", "exec", "spire-server-0", "--", "spire-server"}, args...)...)
}

// CreateEntry registers id under the node alias with the selectors and
// returns the entry's ID.
func (c *Cluster) CreateEntry(id string, selectors ...string) (string, error) {
	args := []string{"entry", "create", "-parentID", NodeAliasID, "-spiffeID", id}
	for _, s := range selectors {
		args = append(args, "-selector", s)
	}
	return c.createEntry(args)
}

// CreateEntryTTL is CreateEntry with an X.509 SVID TTL.
func (c *Cluster) CreateEntryTTL(id string, ttl time.Duration, selectors ...string) (string, error) {
	args := []string{"entry", "create", "-parentID", NodeAliasID, "-spiffeID", id, "-x509SVIDTTL", fmt.Sprint(int(ttl.Seconds()))}
	for _, s := range selectors {
		args = append(args, "-selector", s)
	}
	return c.createEntry(args)
}

func (c *Cluster) createEntry(args []string) (string, error) {
	out, err := c.SPIREServer(args...)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "Entry ID" {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("spire-server entry create printed no Entry ID:\n%s", out)
}

// EntryCommand is the copy-paste command that registers a workload
// entry for a namespace and service account.
func EntryCommand(kubectl, ns, sa string) string {
	return fmt.Sprintf("%s -n spire exec spire-server-0 -- spire-server entry create -parentID %s -spiffeID spiffe://%s/ns/%s/sa/%s -selector k8s:ns:%s -selector k8s:sa:%s",
		kubectl, NodeAliasID, TrustDomain, ns, sa, ns, sa)
}
