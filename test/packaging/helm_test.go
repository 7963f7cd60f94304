package packaging

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const releaseName, releaseNamespace = "spiffe-oci-hook", "spiffe-oci-hook"

// flavours maps the chart's runtime values to the kustomize directories
// that deploy the same thing.
var flavours = []struct{ runtime, kustomize string }{
	{"crio", "deploy/kubernetes/base"},
	{"openshift", "deploy/kubernetes/overlays/openshift"},
	{"containerd-nri", "deploy/kubernetes/overlays/containerd-nri"},
}

var (
	toolsOnce sync.Once
	toolsDir  string
	toolsErr  error
)

// pinnedTool returns the path of helm or kustomize, built on first use
// from the versions test/helm pins.
func pinnedTool(t *testing.T, name string) string {
	t.Helper()
	toolsOnce.Do(func() {
		root := testhelp.RepoRoot(t)
		toolsDir = filepath.Join(root, "bin", "test")
		cmd := exec.Command(filepath.Join(root, "test", "helm", "build.sh"), toolsDir)
		if b, err := cmd.CombinedOutput(); err != nil {
			toolsErr = &buildError{err: err, out: string(b)}
		}
	})
	if toolsErr != nil {
		t.Fatalf("building helm and kustomize (test/helm/build.sh): %v", toolsErr)
	}
	return filepath.Join(toolsDir, name)
}

func helm(t *testing.T) string { return pinnedTool(t, "helm") }

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + "\n" + e.out }

func chartDir(t *testing.T) string {
	return filepath.Join(testhelp.RepoRoot(t), "deploy", "helm", "spiffe-oci-hook")
}

// helmTemplate renders the chart; it returns stderr and a non-nil error if
// helm refused.
// helmTemplate renders the chart with --set for each of sets, or -f for a
// "-f=FILE" (a values file in the chart's directory).
func helmTemplate(t *testing.T, sets ...string) (string, string, error) {
	t.Helper()
	args := []string{"template", releaseName, chartDir(t), "--namespace", releaseNamespace}
	for _, s := range sets {
		if f, ok := strings.CutPrefix(s, "-f="); ok {
			args = append(args, "-f", filepath.Join(chartDir(t), f))
			continue
		}
		args = append(args, "--set", s)
	}
	cmd := exec.Command(helm(t), args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+t.TempDir(), "HELM_CONFIG_HOME="+t.TempDir(), "HELM_DATA_HOME="+t.TempDir())
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func mustTemplate(t *testing.T, sets ...string) string {
	t.Helper()
	out, stderr, err := helmTemplate(t, sets...)
	if err != nil {
		t.Fatalf("helm template %q: %v: %s", sets, err, stderr)
	}
	return out
}

// TestHelmLint: `helm lint --strict` passes for every runtime flavour.
func TestHelmLint(t *testing.T) {
	for _, f := range flavours {
		cmd := exec.Command(helm(t), "lint", "--strict", chartDir(t), "--namespace", releaseNamespace, "--set", "runtime="+f.runtime)
		cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+t.TempDir(), "HELM_CONFIG_HOME="+t.TempDir(), "HELM_DATA_HOME="+t.TempDir())
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("helm lint --strict (runtime=%s): %v\n%s", f.runtime, err, out)
		}
	}
}

// helmOnly are what Helm adds and kustomize does not: release labels, and
// the pod annotation that rolls the pods when the node config changes.
var helmOnlyLabels = []string{"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance"}

const configChecksum = "checksum/node-config"

// objects decodes rendered manifests into comparable objects keyed by
// kind/namespace/name, less what only Helm adds.
func objects(t *testing.T, what, data string) map[string]map[string]any {
	t.Helper()
	out := map[string]map[string]any{}
	for _, n := range decodeDocs(t, what, []byte(data)) {
		var o map[string]any
		if err := n.Decode(&o); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if o == nil {
			continue
		}
		meta, _ := o["metadata"].(map[string]any)
		strip(meta, "labels", helmOnlyLabels...)
		if tmpl, ok := dig(o, "spec", "template", "metadata").(map[string]any); ok {
			strip(tmpl, "annotations", configChecksum)
		}
		sortNamed(o, "")
		key := o["kind"].(string) + "/" + str(meta["namespace"]) + "/" + str(meta["name"])
		if _, dup := out[key]; dup {
			t.Fatalf("%s: %s twice", what, key)
		}
		out[key] = o
	}
	return out
}

// sortNamed sorts, in place, every list whose items are all objects with
// a name (containers, volumes, volumeMounts), except initContainers, whose
// order is their run order. kustomize's strategic merge puts a patch's
// volumes first, Helm's templates put them where they are written; the
// order of these lists means nothing to Kubernetes.
func sortNamed(o any, key string) {
	switch v := o.(type) {
	case map[string]any:
		for k, c := range v {
			sortNamed(c, k)
		}
	case []any:
		named := len(v) > 0
		for _, c := range v {
			sortNamed(c, "")
			m, ok := c.(map[string]any)
			named = named && ok && str(m["name"]) != ""
		}
		if named && key != "initContainers" {
			slices.SortStableFunc(v, func(a, b any) int {
				return strings.Compare(str(a.(map[string]any)["name"]), str(b.(map[string]any)["name"]))
			})
		}
	}
}

func strip(m map[string]any, field string, keys ...string) {
	sub, ok := m[field].(map[string]any)
	if !ok {
		return
	}
	for _, k := range keys {
		delete(sub, k)
	}
	if len(sub) == 0 {
		delete(m, field)
	}
}

func dig(o any, path ...string) any {
	for _, p := range path {
		m, ok := o.(map[string]any)
		if !ok {
			return nil
		}
		o = m[p]
	}
	return o
}

func str(v any) string { s, _ := v.(string); return s }

// TestHelmMatchesKustomize: for each runtime flavour the chart, with its
// default values, renders the very objects kustomize builds from the
// corresponding directory (less Helm's release labels and the config
// checksum annotation). The kustomize files are thereby checked against
// the chart, and the chart inherits every check of manifests_test.go.
// kustomize is the library helm itself pins (test/helm), not whichever
// kubectl is installed.
func TestHelmMatchesKustomize(t *testing.T) {
	kustomize := pinnedTool(t, "kustomize")
	for _, f := range flavours {
		t.Run(f.runtime, func(t *testing.T) {
			rendered := mustTemplate(t, "runtime="+f.runtime, "namespace.create=true")
			built := run(t, testhelp.RepoRoot(t), kustomize, f.kustomize)
			h := objects(t, "helm template", rendered)
			k := objects(t, "kubectl kustomize "+f.kustomize, built)
			keys := func(m map[string]map[string]any) []string {
				var s []string
				for k := range m {
					s = append(s, k)
				}
				slices.Sort(s)
				return s
			}
			if !slices.Equal(keys(h), keys(k)) {
				t.Fatalf("helm renders %q, kustomize builds %q", keys(h), keys(k))
			}
			for key, ko := range k {
				if !reflect.DeepEqual(h[key], ko) {
					hy, _ := yaml.Marshal(h[key])
					ky, _ := yaml.Marshal(ko)
					t.Errorf("%s differs:\n--- helm\n%s\n--- kustomize %s\n%s", key, hy, f.kustomize, ky)
				}
			}
			// And the checks every kustomize flavour passes, on helm's output.
			docs := decodeManifests(t, "helm template", []byte(rendered))
			d := checkNodeDeployment(t, docs, true, flavourHooksDir[f.runtime])
			if f.runtime == "crio" {
				checkStockCRIO(t, d, docs)
			}
		})
	}
}

// TestHelmValues: the values an operator sets reach the objects, and
// values that cannot work are refused with one message.
func TestHelmValues(t *testing.T) {
	out := mustTemplate(t,
		"agent.adminSocket=/run/spire/agent-admin/api.sock",
		"image.repository=registry.example/soh", "image.tag=v1.2.3",
		"tolerations[0].key=node-role.kubernetes.io/control-plane", "tolerations[0].operator=Exists", "tolerations[0].effect=NoSchedule",
		"resources.refresher.limits.memory=256Mi",
		"metrics.address=:9464",
	)
	docs := decodeManifests(t, "helm template", []byte(out))
	if len(only(docs, "Namespace")) != 0 {
		t.Error("a Namespace rendered with namespace.create=false")
	}
	cm := configMapNamed(t, docs, "spiffe-oci-hook-node")
	cfg, err := config.Parse([]byte(cm.Data["config.yaml"]))
	if err != nil {
		t.Fatalf("rendered config.yaml: %v", err)
	}
	if cfg.AgentAdminSocket != "/run/spire/agent-admin/api.sock" {
		t.Errorf("rendered agent_admin_socket %q", cfg.AgentAdminSocket)
	}
	ds := only(docs, "DaemonSet")[0]
	var spec struct {
		Template struct {
			Spec struct {
				Tolerations []map[string]string `yaml:"tolerations"`
				Containers  []struct {
					Name      string   `yaml:"name"`
					Image     string   `yaml:"image"`
					Command   []string `yaml:"command"`
					Resources struct {
						Limits map[string]string `yaml:"limits"`
					} `yaml:"resources"`
					Ports []struct {
						ContainerPort int `yaml:"containerPort"`
					} `yaml:"ports"`
					VolumeMounts []struct {
						Name      string `yaml:"name"`
						MountPath string `yaml:"mountPath"`
					} `yaml:"volumeMounts"`
				} `yaml:"containers"`
				Volumes []volume `yaml:"volumes"`
			} `yaml:"spec"`
		} `yaml:"template"`
	}
	if err := ds.Spec.Decode(&spec); err != nil {
		t.Fatal(err)
	}
	r := spec.Template.Spec.Containers[0]
	if r.Image != "registry.example/soh:v1.2.3" {
		t.Errorf("refresher image %q", r.Image)
	}
	if r.Resources.Limits["memory"] != "256Mi" {
		t.Errorf("refresher limits %v", r.Resources.Limits)
	}
	if i := slices.Index(r.Command, "--metrics-address"); i < 0 || r.Command[i+1] != ":9464" || len(r.Ports) != 1 || r.Ports[0].ContainerPort != 9464 {
		t.Errorf("metrics.address=:9464: command %q, ports %+v", r.Command, r.Ports)
	}
	if tl := spec.Template.Spec.Tolerations; len(tl) != 1 || tl[0]["key"] != "node-role.kubernetes.io/control-plane" {
		t.Errorf("tolerations %v", tl)
	}
	mounted := ""
	for _, m := range r.VolumeMounts {
		if m.Name == "agent-admin" {
			mounted = m.MountPath
		}
	}
	for _, v := range spec.Template.Spec.Volumes {
		if v.Name == "agent-admin" && (v.HostPath == nil || v.HostPath.Path != "/run/spire/agent-admin" || mounted != "/run/spire/agent-admin") {
			t.Errorf("agent-admin volume %+v mounted at %q, want the host's /run/spire/agent-admin at the same path", v.HostPath, mounted)
		}
	}

	for _, tc := range []struct {
		sets []string
		want string
	}{
		// values.schema.json: a wrong value or a typo is refused, never
		// ignored in favour of a default.
		{[]string{"runtime=docker"}, `at '/runtime': value must be one of 'crio', 'openshift', 'containerd-nri'`},
		{[]string{"runtme=openshift"}, `additional properties 'runtme' not allowed`},
		{[]string{"agent.adminsocket=/run/a.sock"}, `additional properties 'adminsocket' not allowed`},
		{[]string{"agent.adminSocket=admin.sock"}, `agent.adminSocket "admin.sock" must be an absolute path`},
		{[]string{"nodeConfig=agent_admin_socket: /elsewhere.sock"}, `nodeConfig agent_admin_socket "/elsewhere.sock" differs from agent.adminSocket`},
		{[]string{"nodeConfig=state_dir: /run/other"}, "nodeConfig state_dir must be /run/spiffe-oci-hook"},
	} {
		_, stderr, err := helmTemplate(t, tc.sets...)
		if err == nil || !strings.Contains(stderr, tc.want) {
			t.Errorf("helm template %q: err %v, stderr %q; want %q", tc.sets, err, stderr, tc.want)
		}
	}
	// A nodeConfig that agrees is rendered as given.
	out = mustTemplate(t, "nodeConfig=failure_policy: fail-open\n")
	if got := configMapNamed(t, decodeManifests(t, "helm template", []byte(out)), "spiffe-oci-hook-node").Data["config.yaml"]; got != "failure_policy: fail-open\n" {
		t.Errorf("nodeConfig rendered as %q", got)
	}
}

// TestHelmChartConfig: the chart's copy of the node config is
// deploy/config.yaml.
func TestHelmChartConfig(t *testing.T) {
	a, err := os.ReadFile(filepath.Join(testhelp.RepoRoot(t), "deploy", "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(chartDir(t), "files", "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Error("deploy/helm/spiffe-oci-hook/files/config.yaml differs from deploy/config.yaml: copy it")
	}
}
