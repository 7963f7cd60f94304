package hook

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
)

// containerd's CRI annotations on an application container (as in a real
// config.json under containerd 2.x).
func containerdAnn(name string) map[string]string {
	return map[string]string{
		annotations.ContainerdContainerType: annotations.ContainerdTypeContainer,
		annotations.ContainerdContainerName: name,
		"io.kubernetes.cri.sandbox-id":      "5d0c6f0e",
		"io.kubernetes.cri.sandbox-name":    "web",
		"io.kubernetes.cri.image-name":      "busybox:latest",
	}
}

func with(m map[string]string, kv ...string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		out[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

// TestFind: which containers asked, and the one case in which a container
// that asked cannot be seen to have asked: containerd ran the hook for a
// pod's container, and no identity annotation reached its spec.
func TestFind(t *testing.T) {
	v := "- cert_dir: /certs\n"
	cases := []struct {
		name    string
		ann     map[string]string
		wantKey string // "" : did not ask
		wantErr error
	}{
		{"direct runc, no annotation", map[string]string{"org.example": "x"}, "", nil},
		{"podman", map[string]string{annotations.Key: v}, annotations.Key, nil},
		{"containerd, allowlisted or copied by spiffe-oci-nri", with(containerdAnn("app"), annotations.Key+".app", v), annotations.Key + ".app", nil},
		{"containerd, another container's annotation (pod_annotations or spiffe-oci-nri)", with(containerdAnn("sidecar"), annotations.Key+".app", v), "", nil},
		{"containerd, pod annotation dropped", containerdAnn("app"), annotations.Key, ErrAnnotationDropped},
		{"containerd sandbox without annotation", with(containerdAnn("pause"), annotations.ContainerdContainerType, "sandbox"), "", nil},
		{"CRI-O, another container's annotation", map[string]string{annotations.CRIOContainerName: "sidecar", "io.kubernetes.cri-o.ContainerType": "container", annotations.Key + ".app": v}, "", nil},
		{"podman 5, a key quoted for podman 4", map[string]string{`"` + annotations.Key: v + `"`}, annotations.Key, ErrAnnotationQuoted},
		{"podman 5, a named key quoted for podman 4", map[string]string{`"` + annotations.Key + ".web": v + `"`}, annotations.Key, ErrAnnotationQuoted},
		{"a quoted look-alike key is not asking", map[string]string{`"` + annotations.Key + "s": v}, "", nil},
		{"look-alike key does not count as identity annotation", with(containerdAnn("app"), annotations.Key+"s", v), annotations.Key, ErrAnnotationDropped},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, err := Find(&specs.State{ID: "c1", Bundle: bundle(t, c.ann), Pid: 1, Annotations: c.ann})
			if !errors.Is(err, c.wantErr) {
				t.Fatalf("error %v, want %v", err, c.wantErr)
			}
			switch {
			case c.wantKey == "" && req != nil:
				t.Errorf("asked, with %s", req.Key)
			case c.wantKey != "" && (req == nil || req.Key != c.wantKey):
				t.Errorf("request %+v, want key %s", req, c.wantKey)
			}
		})
	}
}

// bundle writes a config.json carrying ann.
func bundle(t *testing.T, ann map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	spec := map[string]any{"root": map[string]any{"path": "rootfs"}, "process": map[string]any{}, "annotations": ann}
	data, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestFindFromConfigJSON: a runtime that passes no annotations in the
// state makes Find read them from config.json; the dropped-annotation case
// is seen there too.
func TestFindFromConfigJSON(t *testing.T) {
	req, err := Find(&specs.State{ID: "c1", Bundle: bundle(t, containerdAnn("app")), Pid: 1})
	if !errors.Is(err, ErrAnnotationDropped) || req == nil {
		t.Fatalf("Find: %v, %v; want ErrAnnotationDropped with a request", req, err)
	}
}
