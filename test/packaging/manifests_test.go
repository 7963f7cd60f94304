package packaging

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/containers/common/pkg/hooks"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const (
	imageRef      = "ghcr.io/noderesource/spiffe-oci-hook:latest"
	crioDropInDir = "/etc/crio/crio.conf.d"
	crioDropIn    = "99-spiffe-oci-hook.conf"
)

// Where each flavour puts the hooks JSON. Stock CRI-O reads hooks only from
// containers/common's DefaultDir (CRI-O's hooks_dir default), so the base,
// which ships no CRI-O drop-in, must write there. OpenShift's /usr is
// read-only: its overlay writes OverrideDir and adds it to hooks_dir with a
// drop-in. containerd reads no hooks.d; its overlay writes OverrideDir, which
// is writable on every host and read by NRI's hook-injector.
var flavourHooksDir = map[string]string{
	"crio":           hooks.DefaultDir,
	"openshift":      hooks.OverrideDir,
	"containerd-nri": hooks.OverrideDir,
}

// wantHooksDir is the hooks directory a flavour's DaemonSet must write:
// without kubectl the overlays' patches are not applied, so the base's.
func wantHooksDir(runtime string, built bool) string {
	if !built {
		return flavourHooksDir["crio"]
	}
	return flavourHooksDir[runtime]
}

// manifest is the part of a Kubernetes object these tests read.
type manifest struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name        string            `yaml:"name"`
		Namespace   string            `yaml:"namespace"`
		Labels      map[string]string `yaml:"labels"`
		Annotations map[string]string `yaml:"annotations"`
	} `yaml:"metadata"`
	Data    map[string]string `yaml:"data"`
	Spec    yaml.Node         `yaml:"spec"`
	RoleRef struct {
		APIGroup string `yaml:"apiGroup"`
		Kind     string `yaml:"kind"`
		Name     string `yaml:"name"`
	} `yaml:"roleRef"`
	Subjects []struct {
		Kind      string `yaml:"kind"`
		Name      string `yaml:"name"`
		Namespace string `yaml:"namespace"`
	} `yaml:"subjects"`
	source string // file it came from, for messages
}

type daemonSetSpec struct {
	Selector struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"selector"`
	Template struct {
		Metadata struct {
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"metadata"`
		Spec podSpec `yaml:"spec"`
	} `yaml:"template"`
}

type podSpec struct {
	HostPID            bool        `yaml:"hostPID"`
	PriorityClassName  string      `yaml:"priorityClassName"`
	ServiceAccountName string      `yaml:"serviceAccountName"`
	InitContainers     []container `yaml:"initContainers"`
	Containers         []container `yaml:"containers"`
	Volumes            []volume    `yaml:"volumes"`
}

type container struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Command []string `yaml:"command"`
	Args    []string `yaml:"args"`
	Env     []struct {
		Name  string `yaml:"name"`
		Value string `yaml:"value"`
	} `yaml:"env"`
	SecurityContext securityContext `yaml:"securityContext"`
	VolumeMounts    []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
		ReadOnly  bool   `yaml:"readOnly"`
	} `yaml:"volumeMounts"`
	LivenessProbe  *probe `yaml:"livenessProbe"`
	ReadinessProbe *probe `yaml:"readinessProbe"`
}

type securityContext struct {
	Privileged               *bool `yaml:"privileged"`
	RunAsUser                *int  `yaml:"runAsUser"`
	AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
	ReadOnlyRootFilesystem   *bool `yaml:"readOnlyRootFilesystem"`
	Capabilities             struct {
		Add  []string `yaml:"add"`
		Drop []string `yaml:"drop"`
	} `yaml:"capabilities"`
	SELinuxOptions struct {
		Type string `yaml:"type"`
	} `yaml:"seLinuxOptions"`
}

type probe struct {
	Exec *struct {
		Command []string `yaml:"command"`
	} `yaml:"exec"`
}

type volume struct {
	Name     string `yaml:"name"`
	HostPath *struct {
		Path string `yaml:"path"`
		Type string `yaml:"type"`
	} `yaml:"hostPath"`
	ConfigMap *struct {
		Name string `yaml:"name"`
	} `yaml:"configMap"`
}

// decodeDocs parses every YAML document in data.
func decodeDocs(t *testing.T, what string, data []byte) []yaml.Node {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var docs []yaml.Node
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		docs = append(docs, n)
	}
}

func decodeManifests(t *testing.T, what string, data []byte) []manifest {
	t.Helper()
	var out []manifest
	for _, n := range decodeDocs(t, what, data) {
		var m manifest
		if err := n.Decode(&m); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		m.source = what
		out = append(out, m)
	}
	return out
}

// TestManifestsParse: every YAML document under deploy/ parses, and each is
// a Kubernetes object (apiVersion, kind, metadata.name) or a Kustomization.
func TestManifestsParse(t *testing.T) {
	root := filepath.Join(testhelp.RepoRoot(t), "deploy")
	n := 0
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || (filepath.Ext(p) != ".yaml" && filepath.Ext(p) != ".yml") {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "config.yaml" {
			return nil // the node config, checked by TestShippedConfig
		}
		if strings.HasPrefix(rel, "helm"+string(filepath.Separator)) {
			return nil // templates, checked rendered by helm_test.go
		}
		for _, m := range decodeManifests(t, rel, data) {
			n++
			if m.Kind == "Kustomization" {
				if filepath.Base(p) != "kustomization.yaml" {
					t.Errorf("%s: a Kustomization outside kustomization.yaml", rel)
				}
				continue
			}
			if m.APIVersion == "" || m.Kind == "" || m.Metadata.Name == "" {
				t.Errorf("%s: a document without apiVersion, kind or metadata.name", rel)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 10 {
		t.Errorf("found only %d YAML documents under deploy/", n)
	}
}
