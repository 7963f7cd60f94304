package packaging

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/containers/common/pkg/hooks"
	current "github.com/containers/common/pkg/hooks/1.0.0"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// Where the rpm and `make install PREFIX=/usr` put things. The repo's
// hooks.d JSON names the same hook path.
const (
	rpmHookPath      = "/usr/libexec/oci/hooks.d/spiffe-oci-hook"
	rpmHookDirect    = "/usr/libexec/oci/hooks.d/spiffe-oci-hook-direct" // beside the hook, which runs it
	rpmHooksJSON     = "/usr/share/containers/oci/hooks.d/spiffe-oci-hook.json"
	rpmRefresherPath = "/usr/bin/spiffe-oci-refresher"
	rpmUnitPath      = "/usr/lib/systemd/system/spiffe-oci-refresher.service"
	rpmConfigPath    = "/etc/spiffe-oci-hook/config.yaml"
	rpmTmpfilesPath  = "/usr/lib/tmpfiles.d/spiffe-oci-hook.conf"
	annotationKey    = "identity.noderesource.dev/container"
)

// needTools skips the test when a tool it runs is not installed.
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
}

// needWritableRepo skips the test when it cannot write the repository:
// make builds into bin/ and rpmbuild works in rpm/build/. (Nothing here
// needs root.)
func needWritableRepo(t *testing.T) {
	t.Helper()
	root := testhelp.RepoRoot(t)
	for _, dir := range []string{root, filepath.Join(root, "bin"), filepath.Join(root, "rpm")} {
		if err := unix.Access(dir, unix.W_OK); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Skipf("cannot write %s (%v): make builds into the repository", dir, err)
		}
	}
}

// run runs a command in dir and returns its stdout; it fails the test,
// showing stderr, if the command fails.
func run(t *testing.T, dir string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), err, lastLines(stdout.String(), 40), lastLines(stderr.String(), 40))
	}
	return stdout.String()
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{"..."}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// makeVar prints a Makefile variable as make computes it with vars set.
func makeVar(t *testing.T, name string, vars ...string) string {
	t.Helper()
	args := append([]string{"-s", "--no-print-directory", "--eval", "print-var: ; @echo '$(" + name + ")'", "print-var"}, vars...)
	return strings.TrimSpace(run(t, testhelp.RepoRoot(t), "make", args...))
}

// listTree lists the regular files and symlinks under root, as absolute
// paths inside root ("/usr/bin/x"), sorted.
func listTree(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		out = append(out, "/"+rel)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// docFiles are the documentation files the packages install: README.md
// when the repository has one, the docs/ pages it links to (under docs/,
// so the links hold), and the license.
func docFiles(t *testing.T, docDir, licenseDir string) []string {
	files := []string{licenseDir + "/LICENSE"}
	if _, err := os.Stat(filepath.Join(testhelp.RepoRoot(t), "README.md")); err == nil {
		files = append(files, docDir+"/README.md")
	}
	pages, err := filepath.Glob(filepath.Join(testhelp.RepoRoot(t), "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pages {
		files = append(files, docDir+"/docs/"+filepath.Base(p))
	}
	return files
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	sort.Strings(s)
	return s
}

// hookJSONPath returns hook.path of a hooks.d JSON document.
func hookJSONPath(t *testing.T, data []byte) string {
	t.Helper()
	var raw struct {
		Hook struct {
			Path string `json:"path"`
		} `json:"hook"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		t.Fatalf("hooks.d JSON: %v\n%s", err, data)
	}
	return raw.Hook.Path
}

// readHooksJSON loads a hooks.d JSON document the way CRI-O, Podman and
// NRI's hook-injector do (pkg/hooks Read, which also stats hook.path), after
// pointing hook.path at exe, an executable that exists here. It checks what
// every copy of the JSON must say: version 1.0.0, stages createRuntime and
// poststop, and a "when" that selects exactly the identity annotations.
func readHooksJSON(t *testing.T, what string, data []byte, exe string) *current.Hook {
	t.Helper()
	var raw map[string]any
	if err := json.Unmarshal(data, &raw); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	hook, ok := raw["hook"].(map[string]any)
	if !ok {
		t.Fatalf("%s: no hook object", what)
	}
	hook["path"] = exe
	out, err := json.Marshal(raw)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "spiffe-oci-hook.json")
	if err := os.WriteFile(file, out, 0o644); err != nil {
		t.Fatal(err)
	}
	h, err := hooks.Read(file, nil)
	if err != nil {
		t.Fatalf("%s: hooks.Read: %v", what, err)
	}
	if h.Version != current.Version {
		t.Errorf("%s: version %q, want %q", what, h.Version, current.Version)
	}
	if want := []string{"createRuntime", "poststop"}; !slices.Equal(sorted(h.Stages), want) {
		t.Errorf("%s: stages %q, want %q", what, h.Stages, want)
	}
	spec := &specs.Spec{Process: &specs.Process{Args: []string{"/bin/sh"}}}
	for _, c := range []struct {
		key  string
		want bool
	}{
		{annotationKey, true},
		{annotationKey + ".web", true},
		{annotationKey + "s", false},
		// Quoted for Podman 4's CSV parsing and kept by Podman 5: the
		// hook runs, and refuses the container with its line.
		{`"` + annotationKey, true},
		{`"` + annotationKey + ".web", true},
		{`'` + annotationKey, false},
		{"example.com/container", false},
	} {
		got, err := h.When.Match(spec, map[string]string{c.key: "- cert_dir: /certs\n"}, false)
		if err != nil {
			t.Fatalf("%s: when: %v", what, err)
		}
		if got != c.want {
			t.Errorf("%s: when matches annotation %q = %v, want %v", what, c.key, got, c.want)
		}
	}
	if got, _ := h.When.Match(spec, nil, false); got {
		t.Errorf("%s: the hook runs for containers without annotations", what)
	}
	return h
}

// repoHooksJSON is hooks.d/spiffe-oci-hook.json, with hook.path replaced the
// way `make install` and the manifests render it.
func repoHooksJSON(t *testing.T, hookPath string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(testhelp.RepoRoot(t), "hooks.d", "spiffe-oci-hook.json"))
	if err != nil {
		t.Fatal(err)
	}
	old := `"` + rpmHookPath + `"`
	if bytes.Count(data, []byte(old)) != 1 {
		t.Fatalf("hooks.d/spiffe-oci-hook.json does not name %s exactly once", old)
	}
	return bytes.Replace(data, []byte(old), []byte(`"`+hookPath+`"`), 1)
}

// unitDirectives parses a systemd unit into section -> key -> values, in
// order (a key may repeat).
func unitDirectives(t *testing.T, data []byte) map[string]map[string][]string {
	t.Helper()
	out := map[string]map[string][]string{}
	section := ""
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			out[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("unit line %d: %q", i+1, line)
			}
			out[section][strings.TrimSpace(k)] = append(out[section][strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	return out
}

// execStartArgs returns the words of the unit's single ExecStart=.
func execStartArgs(t *testing.T, unit []byte) []string {
	t.Helper()
	es := unitDirectives(t, unit)["Service"]["ExecStart"]
	if len(es) != 1 {
		t.Fatalf("unit has %d ExecStart= lines, want 1", len(es))
	}
	return strings.Fields(es[0])
}
