package audit

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// pod is what the audit keeps of what the CRI says of one pod sandbox.
type pod struct {
	Name, Namespace string
	// Identity are its identity annotations, each value replaced by
	// whether it is empty (identityOnly).
	Identity map[string]string
}

// maxCRIMessage is the largest ListPodSandbox answer read: the kubelet's
// limit on what it receives from the CRI (16 MiB). gRPC's default, 4 MiB,
// is 17 pods with Kubernetes' largest annotations: other tenants could
// blind the audit with them.
const maxCRIMessage = 16 << 20

// criPods asks a CRI runtime for its ready pods, by sandbox ID. Under
// containerd a pod's annotations stay out of its containers' specs (and
// of its sandbox's) unless spiffe-oci-nri copies them or pod_annotations
// allows them: the CRI is where a pod that asked shows it. A socket that
// does not exist is not an error: not every node runs every runtime.
func criPods(ctx context.Context, socket string) (map[string]pod, error) {
	if _, err := os.Stat(socket); err != nil {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxCRIMessage)))
	if err != nil {
		return nil, fmt.Errorf("CRI %s: %w", socket, err)
	}
	defer conn.Close()
	resp, err := runtimeapi.NewRuntimeServiceClient(conn).ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{
		Filter: &runtimeapi.PodSandboxFilter{State: &runtimeapi.PodSandboxStateValue{State: runtimeapi.PodSandboxState_SANDBOX_READY}},
	})
	if err != nil {
		return nil, fmt.Errorf("CRI %s: ListPodSandbox: %w", socket, err)
	}
	pods := map[string]pod{}
	for _, s := range resp.Items {
		p := pod{Identity: identityOnly(s.Annotations)}
		if m := s.Metadata; m != nil {
			p.Name, p.Namespace = m.Name, m.Namespace
		}
		pods[s.Id] = p
	}
	return pods, nil
}
