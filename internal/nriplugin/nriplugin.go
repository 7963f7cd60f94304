// Package nriplugin is an NRI plugin for containerd that does two things
// for the containers of every pod that asked for an identity: it copies
// the pod's identity annotations onto them, as containerd's pod_annotations
// allowlist would, and it injects spiffe-oci-hook at createRuntime and
// poststop into each container an annotation applies to, so no
// hook-injector is needed. The hook still decides everything else from the
// container's OCI spec. Runner keeps the plugin registered across runtime
// restarts.
package nriplugin

import (
	"context"

	"github.com/containerd/nri/pkg/api"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
)

// Name is the plugin's NRI name. NRI's default validator refuses a
// container whose pod lists it in required-plugins.noderesource.dev while
// the plugin is not registered.
const Name = "spiffe-oci-hook"

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

// Adjust returns the adjustment for one container: nil when neither its
// pod nor its spec has an identity annotation.
//
// Every identity annotation of the pod is copied, also onto containers
// another container's named annotation is meant for: the container's spec
// then reads as it would with the pod_annotations allowlist, and a hook
// that NRI's hook-injector also injected (it matches the pod's annotations)
// sees that the pod asked for another container, not that an annotation
// was dropped. The hook is injected only where an annotation applies.
func Adjust(hook *api.Hook, pod *api.PodSandbox, ctr *api.Container) *api.ContainerAdjustment {
	// The pod's identity annotations, seen with this container's name,
	// decide as they would if containerd had copied them (annotations.Find).
	ann := map[string]string{annotations.ContainerdContainerName: ctr.GetName()}
	var adj *api.ContainerAdjustment
	for k, v := range pod.GetAnnotations() {
		if !annotations.IsIdentityKey(k) {
			continue
		}
		ann[k] = v
		if adj == nil {
			adj = &api.ContainerAdjustment{}
		}
		if _, has := ctr.GetAnnotations()[k]; !has {
			adj.AddAnnotation(k, v)
		}
	}
	// So do those the container's spec has already (containerd's
	// container_annotations or pod_annotations allowlists), and they win,
	// as nothing above replaces them: the hook reads the spec, so a
	// container whose spec asks gets the hook, even if its pod does not.
	for k, v := range ctr.GetAnnotations() {
		if !annotations.IsIdentityKey(k) {
			continue
		}
		ann[k] = v
		if adj == nil {
			adj = &api.ContainerAdjustment{}
		}
	}
	if adj == nil {
		return nil
	}
	if _, _, ok := annotations.Find(ann); ok {
		adj.AddHooks(&api.Hooks{
			CreateRuntime: []*api.Hook{hook},
			Poststop:      []*api.Hook{hook},
		})
	}
	return adj
}
