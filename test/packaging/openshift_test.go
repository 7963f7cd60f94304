package packaging

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containers/common/pkg/hooks"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// crioHooksDirs reads hooks_dir from [crio.runtime] of a CRI-O drop-in.
func crioHooksDirs(t *testing.T, conf string) []string {
	t.Helper()
	section := ""
	var dirs []string
	for _, line := range strings.Split(conf, "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "[") {
			section = line
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == "hooks_dir" {
			if section != "[crio.runtime]" {
				t.Errorf("hooks_dir in %s, want [crio.runtime]", section)
			}
			if err := json.Unmarshal([]byte(strings.TrimSpace(v)), &dirs); err != nil {
				t.Fatalf("hooks_dir %q: %v", v, err)
			}
		}
	}
	return dirs
}

func checkCrioDropIn(t *testing.T, what, conf string) {
	t.Helper()
	dirs := crioHooksDirs(t, conf)
	if want := flavourHooksDir["openshift"]; !slices.Contains(dirs, want) || !slices.Contains(dirs, hooks.DefaultDir) {
		t.Errorf("%s: hooks_dir %q must hold %s (where the hook's JSON goes) and CRI-O's default %s", what, dirs, want, hooks.DefaultDir)
	}
}

// TestKustomizeOpenShift: the ServiceAccount may use the privileged SCC,
// and the initContainer installs the CRI-O drop-in that adds
// /etc/containers/oci/hooks.d to hooks_dir.
func TestKustomizeOpenShift(t *testing.T) {
	dir := filepath.Join(testhelp.RepoRoot(t), "deploy", "kubernetes", "overlays", "openshift")
	docs, built := buildKustomization(t, dir)
	d := checkNodeDeployment(t, docs, built, wantHooksDir("openshift", built))

	rbs := only(docs, "RoleBinding")
	ok := false
	for _, rb := range rbs {
		if rb.RoleRef.Kind != "ClusterRole" || rb.RoleRef.Name != "system:openshift:scc:privileged" {
			continue
		}
		for _, s := range rb.Subjects {
			ok = ok || (s.Kind == "ServiceAccount" && s.Name == d.pod.ServiceAccountName && s.Namespace == d.ds.Metadata.Namespace &&
				rb.Metadata.Namespace == d.ds.Metadata.Namespace)
		}
	}
	if !ok {
		t.Errorf("no RoleBinding in %s gives ServiceAccount %s the privileged SCC", d.ds.Metadata.Namespace, d.pod.ServiceAccountName)
	}

	crio := configMapNamed(t, docs, "spiffe-oci-hook-crio")
	conf, has := crio.Data[crioDropIn]
	if !has {
		t.Fatalf("ConfigMap %s has no %s", crio.Metadata.Name, crioDropIn)
	}
	checkCrioDropIn(t, "ConfigMap "+crio.Metadata.Name, conf)

	if !built {
		t.Log("kubectl not installed: the DaemonSet patch (drop-in mounts, SCC annotation) is not checked")
		return
	}
	var spec daemonSetSpec
	d.ds.Spec.Decode(&spec)
	if got := spec.Template.Metadata.Annotations["openshift.io/required-scc"]; got != "privileged" {
		t.Errorf("pod annotation openshift.io/required-scc=%q, want privileged", got)
	}
	// Under SELinux, container_t may neither write host files nor reach
	// the agent's socket: the pods that do run as spc_t.
	for _, c := range append(slices.Clone(d.pod.InitContainers), d.pod.Containers...) {
		if got := c.SecurityContext.SELinuxOptions.Type; got != "spc_t" {
			t.Errorf("container %s: seLinuxOptions.type %q, want spc_t", c.Name, got)
		}
	}
	src := d.configMapMount(d.install, crio.Metadata.Name)
	dst := d.hostMount(d.install, crioDropInDir)
	if src == "" || dst == "" {
		t.Fatalf("initContainer mounts the drop-in ConfigMap at %q and the host's %s at %q", src, crioDropInDir, dst)
	}
	if d.scriptLine(src+"/*.conf") < 0 || d.scriptLine(dst+"/") < 0 {
		t.Errorf("install script does not copy %s/*.conf into %s:\n%s", src, dst, d.script)
	}
	jsonLine := d.scriptLine(d.hooksMount + "/spiffe-oci-hook.json")
	if l := d.scriptLine(dst + "/"); l > jsonLine {
		t.Errorf("install script writes the CRI-O drop-in (line %d) after the hooks JSON (line %d)", l, jsonLine)
	}
}

// decodeDataURL decodes an Ignition "data:" URL (RFC 2397).
func decodeDataURL(t *testing.T, u string) []byte {
	t.Helper()
	rest, ok := strings.CutPrefix(u, "data:")
	if !ok {
		t.Fatalf("%q is not a data URL", u)
	}
	meta, payload, ok := strings.Cut(rest, ",")
	if !ok {
		t.Fatalf("data URL without a comma: %q", u)
	}
	if strings.HasSuffix(meta, ";base64") {
		b, err := base64.StdEncoding.DecodeString(payload)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	s, err := url.PathUnescape(payload)
	if err != nil {
		t.Fatalf("data URL: %v", err)
	}
	return []byte(s)
}

// TestMachineConfig: the MachineConfig writes, for worker nodes, exactly
// the hooks JSON and the CRI-O drop-in the DaemonSet installs (the MCO
// flags any difference as drift), and the JSON's hook.path is where the
// DaemonSet puts the binary.
func TestMachineConfig(t *testing.T) {
	root := testhelp.RepoRoot(t)
	data, err := os.ReadFile(filepath.Join(root, "deploy", "openshift", "machineconfig.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	docs := decodeManifests(t, "machineconfig.yaml", data)
	if len(docs) != 1 || docs[0].Kind != "MachineConfig" || docs[0].APIVersion != "machineconfiguration.openshift.io/v1" {
		t.Fatalf("machineconfig.yaml: want one machineconfiguration.openshift.io/v1 MachineConfig")
	}
	mc := docs[0]
	if got := mc.Metadata.Labels["machineconfiguration.openshift.io/role"]; got != "worker" {
		t.Errorf("MachineConfig role %q, want worker", got)
	}
	var spec struct {
		Config struct {
			Ignition struct {
				Version string `yaml:"version"`
			} `yaml:"ignition"`
			Storage struct {
				Files []struct {
					Path      string `yaml:"path"`
					Mode      int    `yaml:"mode"`
					Overwrite bool   `yaml:"overwrite"`
					Contents  struct {
						Source string `yaml:"source"`
					} `yaml:"contents"`
				} `yaml:"files"`
			} `yaml:"storage"`
		} `yaml:"config"`
	}
	if err := mc.Spec.Decode(&spec); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(spec.Config.Ignition.Version, "3.") {
		t.Errorf("ignition version %q, want 3.x", spec.Config.Ignition.Version)
	}
	files := map[string][]byte{}
	for _, f := range spec.Config.Storage.Files {
		if f.Mode != 0o644 {
			t.Errorf("%s: mode %o, want 644", f.Path, f.Mode)
		}
		files[f.Path] = decodeDataURL(t, f.Contents.Source)
	}
	jsonPath := flavourHooksDir["openshift"] + "/spiffe-oci-hook.json"
	dropPath := crioDropInDir + "/" + crioDropIn
	if len(files) != 2 || files[jsonPath] == nil || files[dropPath] == nil {
		t.Fatalf("MachineConfig writes %d files, want %s and %s", len(files), jsonPath, dropPath)
	}

	base := checkNodeDeployment(t, resolveKustomization(t, filepath.Join(root, "deploy", "kubernetes", "base")), false, wantHooksDir("crio", false))
	if !bytes.Equal(files[jsonPath], base.hooksJSON) {
		t.Errorf("MachineConfig %s differs from the DaemonSet's ConfigMap:\n%s\nvs\n%s", jsonPath, files[jsonPath], base.hooksJSON)
	}
	exe, _ := os.Executable()
	readHooksJSON(t, "MachineConfig "+jsonPath, files[jsonPath], exe)
	hookPath := hookJSONPath(t, files[jsonPath])
	if base.hostMount(base.install, path.Dir(hookPath)) == "" {
		t.Errorf("MachineConfig's hook.path %s is not in a directory the DaemonSet installs into", hookPath)
	}

	overlay := resolveKustomization(t, filepath.Join(root, "deploy", "kubernetes", "overlays", "openshift"))
	crio := configMapNamed(t, overlay, "spiffe-oci-hook-crio")
	if string(files[dropPath]) != crio.Data[crioDropIn] {
		t.Errorf("MachineConfig %s differs from the overlay's ConfigMap", dropPath)
	}
	checkCrioDropIn(t, "MachineConfig "+dropPath, string(files[dropPath]))
}
