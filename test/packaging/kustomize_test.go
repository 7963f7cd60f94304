package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"gopkg.in/yaml.v3"
)

// kustomization is the part of kustomization.yaml the resolver follows.
type kustomization struct {
	Namespace string   `yaml:"namespace"`
	Resources []string `yaml:"resources"`
	Patches   []struct {
		Path string `yaml:"path"`
	} `yaml:"patches"`
	Images []struct {
		Name    string `yaml:"name"`
		NewName string `yaml:"newName"`
		NewTag  string `yaml:"newTag"`
	} `yaml:"images"`
}

var clusterScoped = map[string]bool{"Namespace": true, "ClusterRole": true, "ClusterRoleBinding": true, "SecurityContextConstraints": true, "MachineConfig": true}

// resolveKustomization follows a kustomization's resources (files and
// directories) without kustomize, applying namespace: and images:. It does
// not apply patches, but checks that their files exist and parse.
func resolveKustomization(t *testing.T, dir string) []manifest {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := yaml.Unmarshal(data, &k); err != nil {
		t.Fatalf("%s/kustomization.yaml: %v", dir, err)
	}
	if len(k.Resources) == 0 {
		t.Fatalf("%s/kustomization.yaml lists no resources", dir)
	}
	var out []manifest
	for _, r := range k.Resources {
		p := filepath.Join(dir, r)
		st, err := os.Stat(p)
		if err != nil {
			t.Fatalf("%s/kustomization.yaml: resource %s: %v", dir, r, err)
		}
		if st.IsDir() {
			out = append(out, resolveKustomization(t, p)...)
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, decodeManifests(t, p, b)...)
	}
	for _, pt := range k.Patches {
		b, err := os.ReadFile(filepath.Join(dir, pt.Path))
		if err != nil {
			t.Fatalf("%s/kustomization.yaml: patch %s: %v", dir, pt.Path, err)
		}
		decodeManifests(t, pt.Path, b)
	}
	for i := range out {
		if k.Namespace != "" && !clusterScoped[out[i].Kind] {
			out[i].Metadata.Namespace = k.Namespace
		}
		if out[i].Kind == "DaemonSet" && len(k.Images) > 0 {
			setImages(&out[i].Spec, k.Images)
		}
	}
	return out
}

// setImages rewrites container images in a DaemonSet spec node the way
// kustomize's images: does.
func setImages(spec *yaml.Node, images []struct {
	Name    string `yaml:"name"`
	NewName string `yaml:"newName"`
	NewTag  string `yaml:"newTag"`
}) {
	var walk func(n *yaml.Node)
	walk = func(n *yaml.Node) {
		for i := 0; i+1 < len(n.Content); i++ {
			if n.Kind == yaml.MappingNode && i%2 == 0 && n.Content[i].Value == "image" {
				v := n.Content[i+1]
				for _, im := range images {
					if v.Value == im.Name {
						name := im.Name
						if im.NewName != "" {
							name = im.NewName
						}
						if im.NewTag != "" {
							name += ":" + im.NewTag
						}
						v.Value = name
					}
				}
			}
		}
		for _, c := range n.Content {
			walk(c)
		}
	}
	walk(spec)
}

// buildKustomization returns the objects of a kustomization: built by
// `kubectl kustomize` when kubectl is installed (patches applied), else
// by resolveKustomization. Both must name the same objects.
func buildKustomization(t *testing.T, dir string) (docs []manifest, patched bool) {
	t.Helper()
	resolved := resolveKustomization(t, dir)
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Logf("kubectl not installed: checking %s without its patches", dir)
		return resolved, false
	}
	out := run(t, dir, "kubectl", "kustomize", ".")
	built := decodeManifests(t, "kubectl kustomize "+dir, []byte(out))
	ids := func(ms []manifest) []string {
		var s []string
		for _, m := range ms {
			s = append(s, m.Kind+"/"+m.Metadata.Namespace+"/"+m.Metadata.Name)
		}
		return sorted(s)
	}
	if !slices.Equal(ids(built), ids(resolved)) {
		t.Errorf("kubectl kustomize %s built %q, the resources lists name %q", dir, ids(built), ids(resolved))
	}
	return built, true
}

func only(docs []manifest, kind string) []manifest {
	var out []manifest
	for _, m := range docs {
		if m.Kind == kind {
			out = append(out, m)
		}
	}
	return out
}

func configMapNamed(t *testing.T, docs []manifest, name string) manifest {
	t.Helper()
	for _, m := range only(docs, "ConfigMap") {
		if m.Metadata.Name == name {
			return m
		}
	}
	t.Fatalf("no ConfigMap %q", name)
	return manifest{}
}
