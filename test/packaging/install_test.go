package packaging

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// makeInstall runs `make install` (which builds both binaries) into a fresh
// DESTDIR and returns it.
func makeInstall(t *testing.T, vars ...string) string {
	t.Helper()
	needTools(t, "make", "go", "git")
	needWritableRepo(t)
	dest := t.TempDir()
	run(t, testhelp.RepoRoot(t), "make", append([]string{"install", "DESTDIR=" + dest}, vars...)...)
	return dest
}

// binaryVersion runs `BIN --version` (both binaries print to stderr).
func binaryVersion(t *testing.T, bin string) string {
	t.Helper()
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("%s --version: %v\n%s", bin, err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestMakeInstall: `make install DESTDIR=... PREFIX=/usr` installs exactly
// the package's files, with the hook before a JSON that pins its path, the
// version passed in, a config that an admin's edits survive, and `make
// uninstall` takes everything but the config away again.
func TestMakeInstall(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	const version = "v9.8.7-pkgtest"
	dest := makeInstall(t, "PREFIX=/usr", "VERSION="+version)

	want := sorted(append([]string{
		rpmHookPath, rpmHookDirect, rpmHooksJSON, rpmRefresherPath, rpmUnitPath, rpmConfigPath, rpmTmpfilesPath,
	}, docFiles(t, "/usr/share/doc/spiffe-oci-hook", "/usr/share/doc/spiffe-oci-hook")...))
	if got := listTree(t, dest); !slices.Equal(got, want) {
		t.Fatalf("make install PREFIX=/usr installed\n  %q\nwant\n  %q", got, want)
	}
	for path, mode := range map[string]os.FileMode{
		rpmHookPath: 0o755, rpmHookDirect: 0o755, rpmRefresherPath: 0o755,
		rpmHooksJSON: 0o644, rpmUnitPath: 0o644, rpmConfigPath: 0o644, rpmTmpfilesPath: 0o644,
	} {
		st, err := os.Stat(dest + path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s: mode %o, want %o", path, st.Mode().Perm(), mode)
		}
	}

	// The JSON names the installed hook; the runtime's loader accepts it.
	data, err := os.ReadFile(dest + rpmHooksJSON)
	if err != nil {
		t.Fatal(err)
	}
	if p := hookJSONPath(t, data); p != rpmHookPath {
		t.Errorf("installed JSON: hook.path %q, want %q", p, rpmHookPath)
	}
	readHooksJSON(t, "installed JSON", data, dest+rpmHookPath)
	if !bytes.Equal(data, repoHooksJSON(t, rpmHookPath)) {
		t.Errorf("installed JSON differs from hooks.d/spiffe-oci-hook.json:\n%s", data)
	}

	// The binaries carry the version make was given.
	for _, bin := range []string{rpmHookPath, rpmHookDirect, rpmRefresherPath} {
		if got := binaryVersion(t, dest+bin); !strings.HasSuffix(got, " "+version) {
			t.Errorf("%s --version = %q, want version %s", bin, got, version)
		}
	}

	// The unit starts the installed refresher with the installed config.
	unit, err := os.ReadFile(dest + rpmUnitPath)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := execStartArgs(t, unit), []string{rpmRefresherPath, "--config", rpmConfigPath}; !slices.Equal(got, want) {
		t.Errorf("installed unit: ExecStart %q, want %q", got, want)
	}

	// The tmpfiles.d entry is the repo's.
	if got, _ := os.ReadFile(dest + rpmTmpfilesPath); !bytes.Equal(got, repoTmpfiles(t)) {
		t.Errorf("installed %s differs from tmpfiles.d/spiffe-oci-hook.conf", rpmTmpfilesPath)
	}

	// The config is deploy/config.yaml, and an edited one is kept.
	cfg, err := os.ReadFile(dest + rpmConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	shipped, err := os.ReadFile(filepath.Join(testhelp.RepoRoot(t), "deploy", "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(cfg, shipped) {
		t.Error("installed config.yaml differs from deploy/config.yaml")
	}
	edited := append(cfg, []byte("failure_policy: fail-open\n")...)
	if err := os.WriteFile(dest+rpmConfigPath, edited, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, testhelp.RepoRoot(t), "make", "install.nobuild", "DESTDIR="+dest, "PREFIX=/usr")
	if got, _ := os.ReadFile(dest + rpmConfigPath); !bytes.Equal(got, edited) {
		t.Error("make install overwrote an edited config.yaml")
	}

	// uninstall removes every binary, the JSON, the unit and the docs, and
	// leaves the admin's config.
	run(t, testhelp.RepoRoot(t), "make", "uninstall", "DESTDIR="+dest, "PREFIX=/usr")
	if got := listTree(t, dest); !slices.Equal(got, []string{rpmConfigPath}) {
		t.Errorf("after make uninstall, left %q, want only %s", got, rpmConfigPath)
	}
}

// TestMakeInstallRendersPaths: with another PREFIX and SYSCONFDIR the JSON
// and the unit name the paths the files really went to, and the hook is told
// where its config is.
func TestMakeInstallRendersPaths(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	dest := makeInstall(t, "PREFIX=/opt/soh", "SYSCONFDIR=/opt/soh/etc")
	const (
		hook   = "/opt/soh/libexec/oci/hooks.d/spiffe-oci-hook"
		js     = "/opt/soh/share/containers/oci/hooks.d/spiffe-oci-hook.json"
		bin    = "/opt/soh/bin/spiffe-oci-refresher"
		unit   = "/opt/soh/lib/systemd/system/spiffe-oci-refresher.service"
		config = "/opt/soh/etc/spiffe-oci-hook/config.yaml"
		tmpf   = "/opt/soh/lib/tmpfiles.d/spiffe-oci-hook.conf"
	)
	want := sorted(append([]string{hook, hook + "-direct", js, bin, unit, config, tmpf},
		docFiles(t, "/opt/soh/share/doc/spiffe-oci-hook", "/opt/soh/share/doc/spiffe-oci-hook")...))
	if got := listTree(t, dest); !slices.Equal(got, want) {
		t.Fatalf("installed\n  %q\nwant\n  %q", got, want)
	}
	data, err := os.ReadFile(dest + js)
	if err != nil {
		t.Fatal(err)
	}
	if p := hookJSONPath(t, data); p != hook {
		t.Errorf("JSON hook.path %q, want %q", p, hook)
	}
	h := readHooksJSON(t, "installed JSON", data, dest+hook)
	if want := []string{"spiffe-oci-hook", "--config", config}; !slices.Equal(h.Hook.Args, want) {
		t.Errorf("JSON hook.args %q, want %q", h.Hook.Args, want)
	}
	u, err := os.ReadFile(dest + unit)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := execStartArgs(t, u), []string{bin, "--config", config}; !slices.Equal(got, want) {
		t.Errorf("unit ExecStart %q, want %q", got, want)
	}
}

// TestInstallOrder: install puts the hook binary in place before the JSON
// that names it appears, and uninstall removes the JSON before the binary,
// so a runtime never loads a hook whose binary is missing.
func TestInstallOrder(t *testing.T) {
	needTools(t, "make")
	root := testhelp.RepoRoot(t)
	dest := "/DESTDIR"
	lines := strings.Split(run(t, root, "make", "-n", "install.nobuild", "DESTDIR="+dest, "PREFIX=/usr"), "\n")
	first := func(pred func(string) bool) int {
		for i, l := range lines {
			if pred(l) {
				return i
			}
		}
		return -1
	}
	binAt := first(func(l string) bool {
		return strings.HasPrefix(l, "install ") && strings.HasSuffix(l, " "+dest+rpmHookPath)
	})
	jsonAt := first(func(l string) bool { return strings.Contains(l, dest+rpmHooksJSON) })
	jsonLive := first(func(l string) bool { return strings.HasSuffix(strings.TrimSpace(l), " "+dest+rpmHooksJSON) })
	if binAt < 0 || jsonAt < 0 || jsonLive < 0 {
		t.Fatalf("make -n install.nobuild: hook binary at line %d, JSON at %d/%d:\n%s", binAt, jsonAt, jsonLive, strings.Join(lines, "\n"))
	}
	if binAt > jsonAt {
		t.Errorf("install touches %s (line %d) before installing the hook binary (line %d)", rpmHooksJSON, jsonAt, binAt)
	}
	// The hook runs spiffe-oci-hook-direct: it goes in first.
	directAt := first(func(l string) bool {
		return strings.HasPrefix(l, "install ") && strings.HasSuffix(l, " "+dest+rpmHookDirect)
	})
	if directAt < 0 || directAt > binAt {
		t.Errorf("install puts spiffe-oci-hook-direct in at line %d, the hook at line %d; want it first", directAt, binAt)
	}
	if !strings.HasPrefix(lines[jsonLive], "mv ") {
		t.Errorf("the JSON is not renamed into place (written in place, readable half-written): %q", lines[jsonLive])
	}

	lines = strings.Split(run(t, root, "make", "-n", "uninstall", "DESTDIR="+dest, "PREFIX=/usr"), "\n")
	jsonAt = first(func(l string) bool { return strings.HasPrefix(l, "rm ") && strings.Contains(l, dest+rpmHooksJSON) })
	binAt = first(func(l string) bool {
		return strings.HasPrefix(l, "rm ") && (strings.HasSuffix(l, " "+dest+rpmHookPath) || strings.Contains(l, " "+dest+rpmHookPath+" "))
	})
	if jsonAt < 0 || binAt < 0 || jsonAt > binAt {
		t.Errorf("uninstall must remove the JSON (line %d) before the hook binary (line %d):\n%s", jsonAt, binAt, strings.Join(lines, "\n"))
	}
	for _, l := range lines {
		if strings.Contains(l, dest+"/etc/") && strings.HasPrefix(l, "rm ") {
			t.Errorf("uninstall removes the node config: %q", l)
		}
	}
}

// TestShippedConfig: deploy/config.yaml parses with the binaries' own parser
// (unknown keys are errors there), validates, sets every key the Config
// type has, and states the built-in defaults, so installing it changes
// nothing until an admin edits it.
func TestShippedConfig(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(testhelp.RepoRoot(t), "deploy", "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse(data)
	if err != nil {
		t.Fatalf("deploy/config.yaml: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("deploy/config.yaml: %v", err)
	}
	d := config.Default()
	if cfg.AgentAPI != d.AgentAPI || cfg.BrokerSocket != d.BrokerSocket || cfg.WorkloadAPISocket != d.WorkloadAPISocket || cfg.BrokerSPIFFEID != d.BrokerSPIFFEID ||
		cfg.AgentAdminSocket != d.AgentAdminSocket || cfg.StateDir != d.StateDir || cfg.Timeout != d.Timeout ||
		cfg.FailurePolicy != d.FailurePolicy || cfg.RequireRefresher != d.RequireRefresher || cfg.RefresherGrace != d.RefresherGrace ||
		!reflect.DeepEqual(cfg.Refresher, d.Refresher) || len(cfg.AllowedAgentSockets) != 0 {
		t.Errorf("deploy/config.yaml = %+v, want the defaults %+v", cfg, d)
	}
	// Every key of the Config type appears, uncommented and documented (a
	// key only in a comment would not be checked by Parse).
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	set := map[string]*yaml.Node{}
	var walk func(prefix string, n *yaml.Node)
	walk = func(prefix string, n *yaml.Node) {
		if n.Kind == yaml.DocumentNode {
			walk(prefix, n.Content[0])
			return
		}
		if n.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			set[prefix+n.Content[i].Value] = n.Content[i]
			walk(prefix+n.Content[i].Value+".", n.Content[i+1])
		}
	}
	walk("", &doc)
	var keys func(prefix string, typ reflect.Type) []string
	keys = func(prefix string, typ reflect.Type) []string {
		var out []string
		for f := range typ.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			out = append(out, prefix+name)
			if f.Type.Kind() == reflect.Struct {
				out = append(out, keys(prefix+name+".", f.Type)...)
			}
		}
		return out
	}
	want := keys("", reflect.TypeFor[config.Config]())
	if len(want) < 9 {
		t.Fatalf("found only keys %q in config.Config", want)
	}
	for _, k := range want {
		n := set[k]
		if n == nil {
			t.Errorf("deploy/config.yaml does not set %s", k)
		} else if strings.TrimSpace(n.HeadComment) == "" {
			t.Errorf("deploy/config.yaml: %s has no comment", k)
		}
	}
	// A typo is an error, as the file's header promises.
	if _, err := config.Parse(append(data, []byte("statedir: /tmp\n")...)); err == nil {
		t.Error("config.Parse accepted an unknown key")
	}
}
