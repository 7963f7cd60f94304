package localcluster

import (
	"path/filepath"
	"time"
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
	args := append([]string{"install", "spiffe-oci-hook", c.HelmChart(), "--namespace", ProjectNamespace,
		"--set", "runtime=" + c.HelmFlavour(),
		"--set", "image.repository=" + imageRepo(ProjectImage), "--set", "image.tag=" + imageTag(ProjectImage),
		"--set", "image.pullPolicy=Never"}, extra...)
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

func imageRepo(ref string) string {
	i := len(ref) - 1
	for i > 0 && ref[i] != ':' {
		i--
	}
	return ref[:i]
}

func imageTag(ref string) string { return ref[len(imageRepo(ref))+1:] }
