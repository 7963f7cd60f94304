// Package nriplugin is an NRI plugin for containerd that does two things
// for every container whose pod asked for an identity: it copies the pod's
// identity annotation onto the container, so no pod_annotations allowlist
// is needed, and it injects spiffe-oci-hook at createRuntime and poststop,
// so no hook-injector is needed. The hook still decides everything else
// from the container's OCI spec.
package nriplugin

import (
	"context"
	"maps"

	"github.com/containerd/nri/pkg/api"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
)

// Plugin adjusts containers being created.
type Plugin struct {
	// Hook is the spiffe-oci-hook invocation to inject.
	Hook *api.Hook
}

// CreateContainer implements stub.CreateContainerInterface.
func (p *Plugin) CreateContainer(_ context.Context, pod *api.PodSandbox, ctr *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	adj := Adjust(p.Hook, pod, ctr)
	return adj, nil, nil
}

// Adjust returns the adjustment for one container: nil when its pod did
// not ask for an identity.
func Adjust(hook *api.Hook, pod *api.PodSandbox, ctr *api.Container) *api.ContainerAdjustment {
	// The pod's annotations, seen with this container's name, decide as
	// they would if containerd had copied them (annotations.Find).
	ann := maps.Clone(pod.GetAnnotations())
	if ann == nil {
		ann = map[string]string{}
	}
	ann[annotations.ContainerdContainerName] = ctr.GetName()
	key, value, ok := annotations.Find(ann)
	if !ok {
		return nil
	}
	adj := &api.ContainerAdjustment{}
	if _, has := ctr.GetAnnotations()[key]; !has {
		adj.AddAnnotation(key, value)
	}
	adj.AddHooks(&api.Hooks{
		CreateRuntime: []*api.Hook{hook},
		Poststop:      []*api.Hook{hook},
	})
	return adj
}
