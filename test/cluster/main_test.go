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
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/test/cluster/localcluster"
)

func TestMain(m *testing.M) {
	// conmon and the containerd shims daemonize: the test binary reaps
	// them, and finds any left behind.
	if err := localcluster.BecomeSubreaper(); err != nil {
		fmt.Fprintf(os.Stderr, "cluster: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	if left := orphans(); len(left) > 0 && code == 0 {
		fmt.Fprintf(os.Stderr, "cluster: processes outlived the tests (killed): %q\n", left)
		code = 1
	}
	os.Exit(code)
}

// orphans kills whatever child of the test binary is still running.
func orphans() []string {
	var left []string
	ents, _ := os.ReadDir("/proc")
	self := fmt.Sprint(os.Getpid())
	for _, e := range ents {
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(data)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[1] == self && f[0] != "Z" {
			cmd, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			var pid int
			fmt.Sscan(e.Name(), &pid)
			unix.Kill(pid, unix.SIGKILL)
			left = append(left, strings.ReplaceAll(string(cmd), "\x00", " "))
		}
	}
	return left
}
