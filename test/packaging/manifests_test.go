package packaging

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/containers/common/pkg/hooks"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
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
	root := filepath.Join(pkgRoot(t), "deploy")
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

// nodeDeployment is what checkNodeDeployment found, for further checks.
type nodeDeployment struct {
	ds        manifest
	pod       podSpec
	install   container
	script    string
	hooksJSON []byte // the hooks.d JSON the initContainer installs
	volumes   map[string]volume
	nri       *container // the containerd-nri overlay's plugin container
	// The host's hooks directory the JSON goes to, and where the
	// initContainer mounts it.
	hooksDir, hooksMount string
}

// hostMount returns where c mounts the hostPath volume for hostDir ("" if
// it does not).
func (d nodeDeployment) hostMount(c container, hostDir string) string {
	for _, m := range c.VolumeMounts {
		if v, ok := d.volumes[m.Name]; ok && v.HostPath != nil && path.Clean(v.HostPath.Path) == path.Clean(hostDir) {
			return m.MountPath
		}
	}
	return ""
}

// configMapMount returns where c mounts ConfigMap name ("" if it does not).
func (d nodeDeployment) configMapMount(c container, name string) string {
	for _, m := range c.VolumeMounts {
		if v, ok := d.volumes[m.Name]; ok && v.ConfigMap != nil && v.ConfigMap.Name == name {
			return m.MountPath
		}
	}
	return ""
}

// scriptLine returns the index of the first line of the install script
// holding all of words, or -1.
func (d nodeDeployment) scriptLine(words ...string) int {
	for i, l := range strings.Split(d.script, "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "#") {
			continue
		}
		ok := true
		for _, w := range words {
			ok = ok && strings.Contains(l, w)
		}
		if ok {
			return i
		}
	}
	return -1
}

// checkNodeDeployment checks the objects every flavour deploys: the
// privileged namespace, and a DaemonSet whose initContainer installs the
// hook binary where its hooks.d JSON says, the JSON into hooksDir after it,
// and the node config; and whose container runs spiffe-oci-refresher with
// the host paths it needs.
func checkNodeDeployment(t *testing.T, docs []manifest, built bool, hooksDir string) nodeDeployment {
	t.Helper()
	var d nodeDeployment
	nss := only(docs, "Namespace")
	dss := only(docs, "DaemonSet")
	if len(nss) != 1 || len(dss) != 1 {
		t.Fatalf("want one Namespace and one DaemonSet, got %d and %d", len(nss), len(dss))
	}
	ns := nss[0]
	if got := ns.Metadata.Labels["pod-security.kubernetes.io/enforce"]; got != "privileged" {
		t.Errorf("namespace %s: pod-security.kubernetes.io/enforce=%q, want privileged", ns.Metadata.Name, got)
	}
	d.ds = dss[0]
	if d.ds.Metadata.Namespace != ns.Metadata.Name {
		t.Errorf("DaemonSet in namespace %q, not in %q", d.ds.Metadata.Namespace, ns.Metadata.Name)
	}
	var spec daemonSetSpec
	if err := d.ds.Spec.Decode(&spec); err != nil {
		t.Fatal(err)
	}
	for k, v := range spec.Selector.MatchLabels {
		if spec.Template.Metadata.Labels[k] != v {
			t.Errorf("DaemonSet selector %s=%s does not match its pod template", k, v)
		}
	}
	d.pod = spec.Template.Spec
	if !d.pod.HostPID {
		t.Error("DaemonSet: hostPID is not true: the refresher cannot open pidfds of container processes")
	}
	if d.pod.PriorityClassName != "system-node-critical" {
		t.Errorf("DaemonSet: priorityClassName %q", d.pod.PriorityClassName)
	}
	sas := only(docs, "ServiceAccount")
	if len(sas) != 1 || sas[0].Metadata.Name != d.pod.ServiceAccountName {
		t.Errorf("DaemonSet's serviceAccountName %q has no ServiceAccount", d.pod.ServiceAccountName)
	}
	d.volumes = map[string]volume{}
	for _, v := range d.pod.Volumes {
		d.volumes[v.Name] = v
	}
	// The NRI plugin (containerd-nri overlay) needs only containerd's
	// socket.
	if i := slices.IndexFunc(d.pod.Containers, func(c container) bool { return c.Name == "nri" }); i >= 0 {
		nri := d.pod.Containers[i]
		d.nri = &nri
		d.pod.Containers = slices.Delete(slices.Clone(d.pod.Containers), i, i+1)
	}
	if len(d.pod.InitContainers) != 1 || len(d.pod.Containers) != 1 {
		t.Fatalf("DaemonSet: %d initContainers and %d containers besides nri, want 1 and 1", len(d.pod.InitContainers), len(d.pod.Containers))
	}
	for _, c := range append(slices.Clone(d.pod.InitContainers), d.pod.Containers...) {
		for _, m := range c.VolumeMounts {
			if _, ok := d.volumes[m.Name]; !ok {
				t.Errorf("container %s mounts volume %q, which the pod does not have", c.Name, m.Name)
			}
		}
		if built && c.Image != imageRef {
			t.Errorf("container %s: image %q, want %q", c.Name, c.Image, imageRef)
		}
	}

	d.install = d.pod.InitContainers[0]
	checkLeastPrivilege(t, d)

	// The initContainer and the ConfigMap it installs from.
	if len(d.install.Command) < 3 || d.install.Command[len(d.install.Command)-2] != "-c" {
		t.Fatalf("initContainer command %q is not a shell script", d.install.Command)
	}
	d.script = d.install.Command[len(d.install.Command)-1]
	var nodeCM manifest
	var cmMount string
	for _, m := range only(docs, "ConfigMap") {
		if _, ok := m.Data["spiffe-oci-hook.json"]; ok {
			nodeCM, cmMount = m, d.configMapMount(d.install, m.Metadata.Name)
		}
	}
	if cmMount == "" {
		t.Fatal("the initContainer mounts no ConfigMap with spiffe-oci-hook.json")
	}
	d.hooksJSON = []byte(nodeCM.Data["spiffe-oci-hook.json"])
	hookPath := hookJSONPath(t, d.hooksJSON)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	readHooksJSON(t, "ConfigMap "+nodeCM.Metadata.Name+" spiffe-oci-hook.json", d.hooksJSON, exe)
	if !bytes.Equal(d.hooksJSON, repoHooksJSON(t, hookPath)) {
		t.Errorf("the ConfigMap's hooks JSON is not hooks.d/spiffe-oci-hook.json with hook.path %s:\n%s", hookPath, d.hooksJSON)
	}
	if strings.HasPrefix(hookPath, "/usr/") {
		t.Errorf("hook.path %s is under /usr, read-only on RHCOS and other image-based hosts", hookPath)
	}

	// The binary goes to the host directory hook.path names, the JSON to
	// the hooks.d directory, in that order.
	binMount := d.hostMount(d.install, path.Dir(hookPath))
	jsonMount := d.hostMount(d.install, hooksDir)
	if binMount == "" || jsonMount == "" {
		t.Fatalf("initContainer does not mount the host's %s (%q) and %s (%q)", path.Dir(hookPath), binMount, hooksDir, jsonMount)
	}
	d.hooksDir, d.hooksMount = hooksDir, jsonMount
	binLine := d.scriptLine(binMount + "/" + path.Base(hookPath) + " ")
	jsonLine := d.scriptLine(cmMount+"/spiffe-oci-hook.json", jsonMount+"/spiffe-oci-hook.json")
	if binLine < 0 || jsonLine < 0 {
		t.Fatalf("install script does not write %s (line %d) and %s from the ConfigMap (line %d):\n%s",
			binMount+"/"+path.Base(hookPath), binLine, jsonMount+"/spiffe-oci-hook.json", jsonLine, d.script)
	}
	if binLine > jsonLine {
		t.Errorf("install script writes the hooks JSON (line %d) before the hook binary (line %d)", jsonLine, binLine)
	}

	// The node config: deploy/config.yaml, installed where the hook on the
	// host reads it.
	shipped, err := os.ReadFile(filepath.Join(pkgRoot(t), "deploy", "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cfgData, ok := nodeCM.Data["config.yaml"]
	if !ok || cfgData != daemonSetConfig(t, shipped) {
		t.Errorf("ConfigMap %s config.yaml is not deploy/config.yaml with require_refresher: true", nodeCM.Metadata.Name)
	}
	cfg, err := config.Parse([]byte(cfgData))
	if err != nil {
		t.Fatalf("ConfigMap config.yaml: %v", err)
	}
	if !cfg.RequireRefresher {
		t.Errorf("ConfigMap %s: require_refresher is not true: once the DaemonSet is removed, the hook it leaves would hand out identities nothing rotates", nodeCM.Metadata.Name)
	}
	confDir := path.Dir(config.DefaultPath)
	if m := d.hostMount(d.install, confDir); m == "" || d.scriptLine(cmMount+"/config.yaml", m+"/config.yaml") < 0 {
		t.Errorf("install script does not copy the ConfigMap's config.yaml to the host's %s", config.DefaultPath)
	}

	// The refresher: same paths inside as on the host, so the config means
	// the same to it and to the hook.
	r := d.pod.Containers[0]
	argv := append(slices.Clone(r.Command), r.Args...)
	if len(argv) == 0 || path.Base(argv[0]) != "spiffe-oci-refresher" {
		t.Fatalf("container %s runs %q, not spiffe-oci-refresher", r.Name, argv)
	}
	if i := slices.Index(argv, "--config"); i < 0 || i+1 >= len(argv) || argv[i+1] != config.DefaultPath {
		t.Errorf("refresher argv %q: want --config %s", argv, config.DefaultPath)
	}
	for _, dir := range []string{cfg.StateDir, path.Dir(cfg.AgentAdminSocket), confDir} {
		if got := d.hostMount(r, dir); got != dir {
			t.Errorf("refresher mounts the host's %s at %q, want the same path", dir, got)
		}
	}
	for _, m := range r.VolumeMounts {
		if v := d.volumes[m.Name]; v.HostPath != nil && path.Clean(v.HostPath.Path) == cfg.StateDir && m.ReadOnly {
			t.Errorf("refresher mounts the state directory read-only")
		}
	}
	// Its probes: the refresher's own client on its unix socket, which
	// the config (the same file) places in the state directory mounted
	// above.
	for what, p := range map[string]*probe{"healthz": r.LivenessProbe, "readyz": r.ReadinessProbe} {
		want := []string{argv[0], "probe", "--config", config.DefaultPath, what}
		if p == nil || p.Exec == nil || !slices.Equal(p.Exec.Command, want) {
			t.Errorf("refresher's %s probe %+v, want exec %q", what, p, want)
		}
	}
	if sock := cfg.StatusSocket(); path.Dir(sock) != cfg.StateDir {
		t.Errorf("the refresher's socket %s is not in the state directory the pod mounts", sock)
	}
	return d
}

// daemonSetConfig is the node config the DaemonSet installs: the shipped
// file, which states the built-in defaults, with require_refresher: true.
func daemonSetConfig(t *testing.T, shipped []byte) string {
	t.Helper()
	const off, on = "\nrequire_refresher: false\n", "\nrequire_refresher: true\n"
	if strings.Count(string(shipped), off) != 1 {
		t.Fatalf("deploy/config.yaml does not set %q once", strings.TrimSpace(off))
	}
	return strings.Replace(string(shipped), off, on, 1)
}

// checkLeastPrivilege: no container is privileged or may gain privileges,
// none writes its own root file system, and each runs as root with only
// the capabilities it needs: the refresher exactly those the systemd unit
// bounds it to, the installer and the NRI plugin none (they write and
// connect to root-owned host files only).
func checkLeastPrivilege(t *testing.T, d nodeDeployment) {
	t.Helper()
	unit, err := os.ReadFile(filepath.Join(pkgRoot(t), "refresher", "spiffe-oci-refresher.service"))
	if err != nil {
		t.Fatal(err)
	}
	var refresherCaps []string
	for _, c := range strings.Fields(strings.Join(unitDirectives(t, unit)["Service"]["CapabilityBoundingSet"], " ")) {
		refresherCaps = append(refresherCaps, strings.TrimPrefix(c, "CAP_"))
	}
	cs := append(slices.Clone(d.pod.InitContainers), d.pod.Containers...)
	if d.nri != nil {
		cs = append(cs, *d.nri)
	}
	for _, c := range cs {
		sc := c.SecurityContext
		if sc.Privileged != nil && *sc.Privileged {
			t.Errorf("container %s is privileged", c.Name)
		}
		if sc.RunAsUser == nil || *sc.RunAsUser != 0 {
			t.Errorf("container %s: runAsUser %v, want 0 (it writes root-owned host files)", c.Name, sc.RunAsUser)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("container %s: allowPrivilegeEscalation is not false", c.Name)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("container %s: readOnlyRootFilesystem is not true", c.Name)
		}
		if !slices.Equal(sc.Capabilities.Drop, []string{"ALL"}) {
			t.Errorf("container %s drops capabilities %q, want [ALL]", c.Name, sc.Capabilities.Drop)
		}
		var want []string
		if c.Name == "refresher" {
			want = refresherCaps
		}
		if !slices.Equal(sorted(sc.Capabilities.Add), sorted(want)) {
			t.Errorf("container %s adds capabilities %q, want %q", c.Name, sc.Capabilities.Add, want)
		}
	}
	if len(refresherCaps) == 0 || !slices.Contains(refresherCaps, "KILL") {
		t.Errorf("the unit's CapabilityBoundingSet %q lacks CAP_KILL", refresherCaps)
	}
}

// TestKustomizeBase: the plain deployment works on stock CRI-O: the JSON
// goes to the one directory CRI-O reads with its default configuration,
// and nothing else is needed (no drop-in, no CRI-O restart).
func TestKustomizeBase(t *testing.T) {
	docs, built := buildKustomization(t, filepath.Join(pkgRoot(t), "deploy", "kubernetes", "base"))
	checkStockCRIO(t, checkNodeDeployment(t, docs, built, wantHooksDir("crio", built)), docs)
}

// checkStockCRIO: a deployment meant for stock CRI-O writes the JSON into
// hooks.DefaultDir, ships no CRI-O drop-in, and its installer refuses a
// node where that directory is not writable, before writing anything,
// with one line naming the directory and what to install instead.
func checkStockCRIO(t *testing.T, d nodeDeployment, docs []manifest) {
	t.Helper()
	if d.hooksDir != hooks.DefaultDir {
		t.Errorf("the JSON goes to %s; stock CRI-O reads only %s", d.hooksDir, hooks.DefaultDir)
	}
	for _, m := range only(docs, "ConfigMap") {
		for k := range m.Data {
			if strings.HasSuffix(k, ".conf") {
				t.Errorf("ConfigMap %s ships %s: the stock-CRI-O flavour must work without a CRI-O drop-in", m.Metadata.Name, k)
			}
		}
	}
	check := d.scriptLine("touch", d.hooksMount+"/")
	fail := d.scriptLine("echo", "$HOOKS_DIR", "openshift", ">&2")
	first := d.scriptLine("put /")
	if check < 0 || fail < 0 || check > first || fail > first {
		t.Errorf("install script does not check that %s is writable, with one line naming it and the openshift overlay, before installing anything:\n%s", d.hooksMount, d.script)
	}
}

// TestKustomizeContainerdNRI: the same DaemonSet, and the documented
// containerd settings pass the identity annotations through and enable NRI.
func TestKustomizeContainerdNRI(t *testing.T) {
	dir := filepath.Join(pkgRoot(t), "deploy", "kubernetes", "overlays", "containerd-nri")
	docs, built := buildKustomization(t, dir)
	d := checkNodeDeployment(t, docs, built, wantHooksDir("containerd-nri", built))

	// The plugin runs spiffe-oci-nri against the host's NRI socket and
	// injects the hook at the path the initContainer installs it to.
	if d.nri == nil {
		t.Fatal("the containerd-nri overlay runs no nri container")
	}
	if len(d.nri.Command) == 0 || d.nri.Command[0] != "/usr/bin/spiffe-oci-nri" {
		t.Errorf("nri container command %q", d.nri.Command)
	}
	if built && d.nri.Image != imageRef {
		t.Errorf("nri container image %q", d.nri.Image)
	}
	flag := func(name string) string {
		if i := slices.Index(d.nri.Command, name); i >= 0 && i+1 < len(d.nri.Command) {
			return d.nri.Command[i+1]
		}
		return ""
	}
	if hp := hookJSONPath(t, d.hooksJSON); flag("--hook-path") != hp {
		t.Errorf("nri injects hook %q, the initContainer installs it at %q", flag("--hook-path"), hp)
	}
	sock := flag("--nri-socket")
	if m := d.hostMount(*d.nri, path.Dir(sock)); m != path.Dir(sock) {
		t.Errorf("nri container does not mount the host's %s at the same path (%q)", path.Dir(sock), m)
	}

	readme, err := os.ReadFile(filepath.Join(dir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var globs []string
	for _, line := range strings.Split(string(readme), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == "pod_annotations" {
			var list []string
			if err := json.Unmarshal([]byte(strings.ReplaceAll(strings.TrimSpace(v), "'", `"`)), &list); err != nil {
				t.Fatalf("README pod_annotations %q: %v", v, err)
			}
			globs = append(globs, list...)
		}
	}
	if len(globs) < 2 {
		t.Fatalf("README.md shows pod_annotations %d times, want a containerd 2.x and a 1.7 snippet", len(globs))
	}
	for _, g := range globs {
		for _, key := range []string{annotationKey, annotationKey + ".web"} {
			if ok, err := path.Match(g, key); err != nil || !ok {
				t.Errorf("pod_annotations glob %q does not pass annotation %s", g, key)
			}
		}
	}
	for _, s := range []string{`[plugins.'io.containerd.nri.v1.nri']`, `[plugins."io.containerd.nri.v1.nri"]`, "disable = false", flavourHooksDir["containerd-nri"]} {
		if !strings.Contains(string(readme), s) {
			t.Errorf("README.md lacks %q", s)
		}
	}

	checkContainerdNRIConfig(t, dir, sock, string(readme))
}

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
	dir := filepath.Join(pkgRoot(t), "deploy", "kubernetes", "overlays", "openshift")
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
	root := pkgRoot(t)
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

// TestContainerfile: the image puts the binaries where the DaemonSet runs
// and copies them from.
func TestContainerfile(t *testing.T) {
	root := pkgRoot(t)
	data, err := os.ReadFile(filepath.Join(root, "deploy", "Containerfile"))
	if err != nil {
		t.Fatal(err)
	}
	inImage := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "COPY" || !strings.HasPrefix(f[1], "--from=") {
			continue
		}
		dst := f[len(f)-1]
		for _, src := range f[2 : len(f)-1] {
			if strings.HasSuffix(dst, "/") {
				inImage[dst+path.Base(src)] = true
			} else {
				inImage[dst] = true
			}
		}
	}
	d := checkNodeDeployment(t, resolveKustomization(t, filepath.Join(root, "deploy", "kubernetes", "base")), false, wantHooksDir("crio", false))
	refresher := d.pod.Containers[0].Command[0]
	if !inImage[refresher] {
		t.Errorf("the refresher container runs %s, which the Containerfile does not put there (it copies %v)", refresher, inImage)
	}
	found := false
	for img := range inImage {
		if path.Base(img) == "spiffe-oci-hook" {
			found = true
			if d.scriptLine("put "+img+" ") < 0 {
				t.Errorf("the install script does not copy the image's %s:\n%s", img, d.script)
			}
		}
	}
	if !found {
		t.Errorf("the Containerfile puts no spiffe-oci-hook binary in the image: %v", inImage)
	}
}
