package userns

import (
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/files"
)

func spec(uid, gid uint32, linux *specs.Linux) *specs.Spec {
	return &specs.Spec{Process: &specs.Process{User: specs.User{UID: uid, GID: gid}}, Linux: linux}
}

func idmap(container, host, size uint32) []specs.LinuxIDMapping {
	return []specs.LinuxIDMapping{{ContainerID: container, HostID: host, Size: size}}
}

func TestHostOwner(t *testing.T) {
	tests := []struct {
		name string
		spec *specs.Spec
		want files.Owner
	}{
		{"no linux section", spec(1000, 2000, nil), files.Owner{UID: 1000, GID: 2000}},
		{"no mappings", spec(1000, 2000, &specs.Linux{}), files.Owner{UID: 1000, GID: 2000}},
		{"root without mappings", spec(0, 0, &specs.Linux{}), files.Owner{UID: 0, GID: 0}},
		{"root mapped", spec(0, 0, &specs.Linux{UIDMappings: idmap(0, 100000, 65536), GIDMappings: idmap(0, 100000, 65536)}), files.Owner{UID: 100000, GID: 100000}},
		{"user mapped", spec(1000, 2000, &specs.Linux{UIDMappings: idmap(0, 100000, 65536), GIDMappings: idmap(0, 100000, 65536)}), files.Owner{UID: 101000, GID: 102000}},
		{"last id of range", spec(65535, 65535, &specs.Linux{UIDMappings: idmap(0, 100000, 65536), GIDMappings: idmap(0, 100000, 65536)}), files.Owner{UID: 165535, GID: 165535}},
		{"second range", spec(1500, 10, &specs.Linux{
			UIDMappings: []specs.LinuxIDMapping{{ContainerID: 0, HostID: 5000, Size: 1000}, {ContainerID: 1000, HostID: 200000, Size: 1000}},
			GIDMappings: []specs.LinuxIDMapping{{ContainerID: 0, HostID: 7000, Size: 100}},
		}), files.Owner{UID: 200500, GID: 7010}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := HostOwner(tt.spec)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("HostOwner() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestHostOwnerErrors(t *testing.T) {
	tests := []struct {
		name string
		spec *specs.Spec
		want []string
	}{
		{"no process", &specs.Spec{}, []string{"no process"}},
		{"uid outside mapping", spec(65536, 0, &specs.Linux{UIDMappings: idmap(0, 100000, 65536), GIDMappings: idmap(0, 100000, 65536)}),
			[]string{"process uid 65536", "linux.uidMappings"}},
		{"uid below mapping", spec(5, 0, &specs.Linux{UIDMappings: idmap(1000, 100000, 10), GIDMappings: idmap(0, 100000, 65536)}),
			[]string{"process uid 5", "linux.uidMappings"}},
		{"uid mappings only", spec(0, 0, &specs.Linux{UIDMappings: idmap(0, 100000, 65536)}),
			[]string{"process gid 0", "linux.gidMappings"}},
		{"gid outside mapping", spec(0, 70000, &specs.Linux{UIDMappings: idmap(0, 100000, 65536), GIDMappings: idmap(0, 100000, 65536)}),
			[]string{"process gid 70000", "linux.gidMappings"}},
		{"gid mappings only", spec(0, 0, &specs.Linux{GIDMappings: idmap(0, 100000, 65536)}),
			[]string{"process uid 0", "linux.uidMappings"}},
		{"zero-size mapping", spec(0, 0, &specs.Linux{UIDMappings: idmap(0, 100000, 0), GIDMappings: idmap(0, 100000, 1)}),
			[]string{"process uid 0", "linux.uidMappings"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := HostOwner(tt.spec)
			if err == nil {
				t.Fatalf("HostOwner() = %+v, want error", got)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}
