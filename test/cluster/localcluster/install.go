package localcluster

import (
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
		// SPIRE's Helm chart puts the agent's admin socket here
		// (sockets.admin.mountOnHost).
		"--set", "agent.adminSocket=" + AgentAdminSocket}
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
	return c.Rollout(ProjectNamespace, ProjectDaemonSet, 3*time.Minute)
}

// InstallKustomize applies an overlay of deploy/kubernetes unmodified
// (its image is the release tag, which the local image also carries) and
// waits for the DaemonSet's rollout.
func (c *Cluster) InstallKustomize(overlay string) error {
	if _, err := c.Kubectl("apply", "-k", filepath.Join(c.RepoRoot, "deploy", "kubernetes", overlay)); err != nil {
		return err
	}
	return c.Rollout(ProjectNamespace, ProjectDaemonSet, 3*time.Minute)
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

// UpgradeKustomize applies the overlay with the release image's tag
// changed to UpgradeReleaseImage's, as a user's own kustomization would:
// one in a temporary directory that names the repository's overlay as a
// resource and sets images. It returns once kubectl has applied it.
func (c *Cluster) UpgradeKustomize(overlay string) error {
	dir, err := os.MkdirTemp(c.Dir, "upgrade-kustomization-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	rel, err := filepath.Rel(dir, filepath.Join(c.RepoRoot, "deploy", "kubernetes", overlay))
	if err != nil {
		return err
	}
	k := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - " + rel +
		"\nimages:\n  - name: " + imageRepo(UpgradeReleaseImage) + "\n    newTag: " + imageTag(UpgradeReleaseImage) + "\n"
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
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

// UninstallKustomize deletes what the overlay applied, its namespace
// included.
func (c *Cluster) UninstallKustomize(overlay string) error {
	_, err := c.Kubectl("delete", "-k", filepath.Join(c.RepoRoot, "deploy", "kubernetes", overlay))
	return err
}
