// Package cluster installs spiffe-oci-hook the way users do, on a real
// one-node Kubernetes cluster (localcluster: etcd, API server, controller
// manager, scheduler and kubelet v1.34.4) with SPIRE deployed in it, once
// with CRI-O (stock hooks configuration, `helm install`) and once with
// containerd (NRI, `kubectl apply -k` of the containerd-nri overlay). It
// needs root, runc, conmon, podman and busybox-static (test/deps.sh); the
// cluster's programs are built from the pinned tools modules (test/kubernetes,
// test/cni, test/crio, test/containerd, test/crictl, test/helm, test/spire).
package cluster

import (
	"testing"

	"github.com/noderesource/spiffe-oci-hook/test/subreaper"
)

func TestMain(m *testing.M) {
	// conmon and the containerd shims daemonize: the test binary reaps
	// them, and finds any left behind.
	subreaper.Main(m, "cluster")
}
