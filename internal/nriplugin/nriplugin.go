// Package nriplugin is an NRI plugin for containerd that does two things
// for the containers of every pod that asked for an identity: it copies
// the pod's identity annotation that applies to each container onto it,
// as containerd's pod_annotations allowlist would (but none of the
// others), and it injects spiffe-oci-hook at createRuntime and
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
// A pod chooses how many identity annotations it has and how large they
// are, and each is meant for one container (or, unnamed, for all), so
// only the one that applies to this container (annotations.Find) is
// copied, with its value, and the hook is injected. A container none
// applies to gets one of the pod's identity keys without its value: a
// hook that NRI's hook-injector also injected (it matches the pod's
// annotations) then sees that the pod asked for another container, not
// that an annotation was dropped; an empty named annotation of another
// container asks nothing of this one. An identity annotation the
// container's spec has already (containerd's container_annotations or
// pod_annotations allowlists) wins and nothing is copied: the hook reads
// the spec, so a container whose spec asks gets the hook, even if its pod
// does not.
func Adjust(hook *api.Hook, pod *api.PodSandbox, ctr *api.Container) *api.ContainerAdjustment {
	// The pod's identity annotations, seen with this container's name,
	// decide as they would if containerd had copied them; the
	// container's own replace them.
	ann := map[string]string{annotations.ContainerdContainerName: ctr.GetName()}
	other := ""
	for k, v := range pod.GetAnnotations() {
		if annotations.IsIdentityKey(k) {
			ann[k] = v
			if other == "" || k < other {
				other = k
			}
		}
	}
	has := false
	for k, v := range ctr.GetAnnotations() {
		if annotations.IsIdentityKey(k) {
			ann[k], has = v, true
		}
	}
	if other == "" && !has {
		return nil
	}
	adj := &api.ContainerAdjustment{}
	key, value, ok := annotations.Find(ann)
	switch _, own := ctr.GetAnnotations()[key]; {
	case ok && !own:
		adj.AddAnnotation(key, value)
	case !ok && !has:
		adj.AddAnnotation(other, "")
	}
	if ok {
		adj.AddHooks(hooks(hook))
	}
	return adj
}

func hooks(hook *api.Hook) *api.Hooks {
	return &api.Hooks{CreateRuntime: []*api.Hook{hook}, Poststop: []*api.Hook{hook}}
}
