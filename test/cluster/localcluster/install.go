package localcluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ProjectNamespace is where both install paths put the DaemonSet.
const ProjectNamespace = "spiffe-oci-hook"

// ProjectDaemonSet is the DaemonSet both install paths create (release
// name spiffe-oci-hook for Helm).
const ProjectDaemonSet = "daemonset/spiffe-oci-hook"

// HelmChart is the chart's directory.
func (c *Cluster) HelmChart() string {
	return filepath.Join(c.RepoRoot, "deploy", "helm", "spiffe-oci-hook")
}

// HelmFlavour is the chart's runtime value for the cluster's runtime.
func (c *Cluster) HelmFlavour() string {
	if c.Runtime == "containerd" {
		return "containerd-nri"
	}
	return "crio"
}

// InstallHelm installs the chart as the README says: the namespace
// created and labelled first, then `helm install` with the runtime's
// flavour and the locally built image, extra values appended. It waits
// for the DaemonSet's rollout.
func (c *Cluster) InstallHelm(extra ...string) error {
	if _, err := c.Kubectl("create", "namespace", ProjectNamespace); err != nil {
		return err
	}
	if _, err := c.Kubectl("label", "namespace", ProjectNamespace, "pod-security.kubernetes.io/enforce=privileged"); err != nil {
		return err
	}
	args := []string{"install", "spiffe-oci-hook", c.HelmChart(), "--namespace", ProjectNamespace,
		"--set", "runtime=" + c.HelmFlavour(),
		"--set", "image.repository=" + imageRepo(ProjectImage), "--set", "image.tag=" + imageTag(ProjectImage),
		"--set", "image.pullPolicy=Never",
		// SPIRE installed with its Helm chart: the agent's sockets where
		// that chart puts them on the host, and the hook's and the
		// refresher's entries as spire-controller-manager objects of this
		// cluster's class, trust domain and k8s_psat cluster.
		"-f", filepath.Join(c.HelmChart(), "values-spire-chart.yaml"),
		"--set", "registration.className=" + ClassName,
		"--set", "registration.trustDomain=" + TrustDomain,
		"--set", "registration.clusterName=" + ClusterName}
	if c.Runtime == "crio" && !hasCapSysResource() {
		// A system-node-critical pod gets oom_score_adj -997 from the
		// kubelet, which runc cannot set without CAP_SYS_RESOURCE ("failed
		// to update /proc/self/oom_score_adj: Permission denied"); CRI-O
		// has no restrict_oom_score_adj as containerd has. Only on such a
		// host (this sandbox), the pods get no priority class.
		c.logf("no CAP_SYS_RESOURCE here: installing with priorityClassName=\"\" (runc cannot lower oom_score_adj for a node-critical pod)")
		args = append(args, "--set", "priorityClassName=")
	}
	args = append(args, extra...)
	if _, err := c.Helm(args...); err != nil {
		return err
	}
	if err := c.Rollout(ProjectNamespace, ProjectDaemonSet, 3*time.Minute); err != nil {
		return err
	}
	return c.waitHookEntry()
}

// InstallKustomize applies an overlay of deploy/kubernetes (its image is
// the release tag, which the local image also carries) through a
// kustomization of the user's own that adapts it to SPIRE's Helm chart
// socket paths for api ("delegated" or "broker"; SPIREChartKustomization),
// and waits for the DaemonSet's rollout.
func (c *Cluster) InstallKustomize(overlay, api string) error {
	dir, err := c.SPIREChartKustomization("kustomize-install", overlay, api, "")
	if err != nil {
		return err
	}
	// The overlays render no registration: the user's own objects.
	reg, err := c.manifest("delegates.yaml")
	if err != nil {
		return err
	}
	if _, err := c.KubectlStdin(reg, "apply", "-f", "-"); err != nil {
		return err
	}
	if _, err := c.Kubectl("apply", "-k", dir); err != nil {
		return err
	}
	if err := c.Rollout(ProjectNamespace, ProjectDaemonSet, 3*time.Minute); err != nil {
		return err
	}
	return c.waitHookEntry()
}

// SPIREChartKustomization writes c.Dir/name/kustomization.yaml, a user's
// own kustomization that names an overlay of deploy/kubernetes as its
// resource and points it at the SPIRE agent's sockets where SPIRE's Helm
// chart puts them on the host: the node config's agent_admin_socket,
// broker_socket and workload_api_socket (agent_api set to api), and the
// refresher's host mounts of their directories. extra is appended
// (images:, say). It returns the directory.
func (c *Cluster) SPIREChartKustomization(name, overlay, api, extra string) (string, error) {
	if api != "delegated" && api != "broker" {
		return "", fmt.Errorf("agent API %q: want delegated or broker", api)
	}
	dir := filepath.Join(c.Dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	base, err := os.ReadFile(filepath.Join(c.RepoRoot, "deploy", "kubernetes", "base", "configmap.yaml"))
	if err != nil {
		return "", err
	}
	cm := string(base)
	for _, r := range [][2]string{
		{"    agent_api: delegated\n", "    agent_api: " + api + "\n"},
		{"    agent_admin_socket: /run/spire/agent/admin/admin.sock\n", "    agent_admin_socket: " + AgentAdminSocket + "\n"},
		{"    broker_socket: /run/spire/agent/broker/broker.sock\n", "    broker_socket: " + AgentBrokerSocket + "\n"},
		{"    workload_api_socket: /run/spire/agent/public/api.sock\n", "    workload_api_socket: " + WorkloadAPISocket + "\n"},
	} {
		if !strings.Contains(cm, r[0]) {
			return "", fmt.Errorf("deploy/kubernetes/base/configmap.yaml has no line %q", strings.TrimSpace(r[0]))
		}
		cm = strings.Replace(cm, r[0], r[1], 1)
	}
	cm = strings.Replace(cm, "metadata:\n  name: spiffe-oci-hook-node\n", "metadata:\n  name: spiffe-oci-hook-node\n  namespace: "+ProjectNamespace+"\n", 1)
	// volumeMounts merge by mountPath: the base's admin mount goes, the
	// chart's directories come.
	mounts := map[string]string{"agent-admin": filepath.Dir(AgentAdminSocket)}
	if api == "broker" {
		mounts["agent-broker"] = filepath.Dir(AgentBrokerSocket)
		mounts["agent-workload-api"] = WorkloadAPIDir
	}
	ds := "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: spiffe-oci-hook\n  namespace: " + ProjectNamespace +
		"\nspec:\n  template:\n    spec:\n      containers:\n        - name: refresher\n          volumeMounts:\n" +
		"            - mountPath: /run/spire/agent/admin\n              $patch: delete\n"
	vols := "      volumes:\n"
	for _, n := range []string{"agent-admin", "agent-broker", "agent-workload-api"} {
		d, ok := mounts[n]
		if !ok {
			continue
		}
		ds += fmt.Sprintf("            - name: %s\n              mountPath: %s\n              mountPropagation: HostToContainer\n              readOnly: true\n", n, d)
		vols += fmt.Sprintf("        - name: %s\n          hostPath:\n            path: %s\n            type: DirectoryOrCreate\n", n, d)
	}
	ds += vols
	rel, err := filepath.Rel(dir, filepath.Join(c.RepoRoot, "deploy", "kubernetes", overlay))
	if err != nil {
		return "", err
	}
	k := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - " + rel +
		"\npatches:\n  - path: node-config.yaml\n  - path: daemonset-sockets.yaml\n" + extra
	for f, data := range map[string]string{"kustomization.yaml": k, "node-config.yaml": cm, "daemonset-sockets.yaml": ds} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(data), 0o644); err != nil {
			return "", err
		}
	}
	return dir, nil
}

// hasCapSysResource reports whether this process has CAP_SYS_RESOURCE,
// which lowering a process's oom_score_adj needs.
func hasCapSysResource() bool {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	return false
}

func imageRepo(ref string) string {
	i := len(ref) - 1
	for i > 0 && ref[i] != ':' {
		i--
	}
	return ref[:i]
}

func imageTag(ref string) string { return ref[len(imageRepo(ref))+1:] }

// UpgradeHelm upgrades the release as docs/install-lifecycle.md says
// (--reuse-values, a new image tag), extra values appended. It returns
// once helm has applied the release, without waiting for the rollout.
func (c *Cluster) UpgradeHelm(extra ...string) error {
	args := append([]string{"upgrade", "spiffe-oci-hook", c.HelmChart(), "--namespace", ProjectNamespace,
		"--reuse-values", "--set", "image.tag=" + imageTag(UpgradeImage)}, extra...)
	_, err := c.Helm(args...)
	return err
}

// UpgradeKustomize applies the install's kustomization
// (SPIREChartKustomization) with the release image's tag changed to
// UpgradeReleaseImage's, as a user's own kustomization would (images:).
// It returns once kubectl has applied it.
func (c *Cluster) UpgradeKustomize(overlay, api string) error {
	dir, err := c.SPIREChartKustomization("kustomize-upgrade", overlay, api,
		"images:\n  - name: "+imageRepo(UpgradeReleaseImage)+"\n    newTag: "+imageTag(UpgradeReleaseImage)+"\n")
	if err != nil {
		return err
	}
	_, err = c.Kubectl("apply", "-k", dir)
	return err
}

// UninstallHelm runs helm uninstall.
func (c *Cluster) UninstallHelm() error {
	_, err := c.Helm("uninstall", "spiffe-oci-hook", "--namespace", ProjectNamespace)
	return err
}

// UninstallKustomize deletes what InstallKustomize applied, its
// namespace included.
func (c *Cluster) UninstallKustomize() error {
	_, err := c.Kubectl("delete", "-k", filepath.Join(c.Dir, "kustomize-install"))
	return err
}
