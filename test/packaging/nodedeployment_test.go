package packaging

import (
	"bytes"
	"encoding/json"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containers/common/pkg/hooks"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

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
	shipped, err := os.ReadFile(filepath.Join(testhelp.RepoRoot(t), "deploy", "config.yaml"))
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
	unit, err := os.ReadFile(filepath.Join(testhelp.RepoRoot(t), "refresher", "spiffe-oci-refresher.service"))
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
	docs, built := buildKustomization(t, filepath.Join(testhelp.RepoRoot(t), "deploy", "kubernetes", "base"))
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
	dir := filepath.Join(testhelp.RepoRoot(t), "deploy", "kubernetes", "overlays", "containerd-nri")
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
