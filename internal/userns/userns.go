// Package userns maps a container's process user to the host ids that must
// own its identity files, for containers in a user namespace.
package userns

import (
	"fmt"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

// HostOwner returns the host uid and gid that the container's process user
// is inside the container. Without user-namespace mappings they are equal.
func HostOwner(spec *specs.Spec) (files.Owner, error) {
	if spec.Process == nil {
		return files.Owner{}, fmt.Errorf("bundle config has no process")
	}
	uid, gid := spec.Process.User.UID, spec.Process.User.GID
	if spec.Linux == nil || (len(spec.Linux.UIDMappings) == 0 && len(spec.Linux.GIDMappings) == 0) {
		return files.Owner{UID: int(uid), GID: int(gid)}, nil
	}
	hu, ok := toHost(spec.Linux.UIDMappings, uid)
	if !ok {
		return files.Owner{}, fmt.Errorf("process uid %d has no mapping in linux.uidMappings: the key could not be owned by the container's user", uid)
	}
	hg, ok := toHost(spec.Linux.GIDMappings, gid)
	if !ok {
		return files.Owner{}, fmt.Errorf("process gid %d has no mapping in linux.gidMappings: the key could not be owned by the container's group", gid)
	}
	return files.Owner{UID: int(hu), GID: int(hg)}, nil
}

func toHost(mappings []specs.LinuxIDMapping, id uint32) (uint32, bool) {
	for _, m := range mappings {
		if id >= m.ContainerID && uint64(id) < uint64(m.ContainerID)+uint64(m.Size) {
			return m.HostID + (id - m.ContainerID), true
		}
	}
	return 0, false
}
