package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestPathsAgree: one hook path everywhere it is written down for a /usr
// install: the repo's hooks.d JSON, the Makefile's HOOK_DIR for PREFIX=/usr
// and its SHIPPED_HOOK_PATH, and the spec's %files; likewise the JSON, the
// unit, the tmpfiles.d and the config directories, and the unit's ExecStart.
func TestPathsAgree(t *testing.T) {
	needTools(t, "make")
	root := testhelp.RepoRoot(t)
	repoJSON, err := os.ReadFile(filepath.Join(root, "hooks.d", "spiffe-oci-hook.json"))
	if err != nil {
		t.Fatal(err)
	}
	if p := hookJSONPath(t, repoJSON); p != rpmHookPath {
		t.Errorf("hooks.d/spiffe-oci-hook.json: hook.path %q, want %q", p, rpmHookPath)
	}
	usr := []string{"PREFIX=/usr"}
	for name, want := range map[string]string{
		"SHIPPED_HOOK_PATH":      rpmHookPath,
		"SHIPPED_REFRESHER_PATH": rpmRefresherPath,
		"DEFAULT_CONFIG":         rpmConfigPath,
		"HOOK_DIR":               filepath.Dir(rpmHookPath),
		"HOOKS_JSON_DIR":         filepath.Dir(rpmHooksJSON),
		"BINDIR":                 filepath.Dir(rpmRefresherPath),
		"UNITDIR":                filepath.Dir(rpmUnitPath),
		"CONFDIR":                filepath.Dir(rpmConfigPath),
		"TMPFILESDIR":            filepath.Dir(rpmTmpfilesPath),
	} {
		if got := makeVar(t, name, usr...); got != want {
			t.Errorf("Makefile %s = %q with PREFIX=/usr, want %q", name, got, want)
		}
	}
	unit, err := os.ReadFile(filepath.Join(root, "refresher", "spiffe-oci-refresher.service"))
	if err != nil {
		t.Fatal(err)
	}
	if got := execStartArgs(t, unit); !slices.Equal(got, []string{rpmRefresherPath, "--config", rpmConfigPath}) {
		t.Errorf("refresher/spiffe-oci-refresher.service ExecStart %q", got)
	}

	if _, err := exec.LookPath("rpmspec"); err != nil {
		t.Log("rpmspec not installed: the spec files section is not checked")
		return
	}
	spec := run(t, root, "rpmspec", "-P", filepath.Join("rpm", "spiffe-oci-hook.spec"))
	_, files, ok := strings.Cut(spec, "\n%files\n")
	if !ok {
		t.Fatalf("rpmspec -P: no %%files section")
	}
	files, _, _ = strings.Cut(files, "\n%changelog")
	listed := map[string]string{} // path -> attributes before it
	for _, line := range strings.Split(files, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 {
			listed[f[len(f)-1]] = strings.Join(f[:len(f)-1], " ")
		}
	}
	for p, attr := range map[string]string{
		rpmHookPath: "", rpmHookDirect: "", rpmHooksJSON: "", rpmRefresherPath: "", rpmUnitPath: "", rpmTmpfilesPath: "",
		rpmConfigPath: "%config(noreplace)",
	} {
		got, ok := listed[p]
		if !ok {
			t.Errorf("spec %%files does not list %s:\n%s", p, files)
		} else if got != attr {
			t.Errorf("spec %%files: %s has %q, want %q", p, got, attr)
		}
	}
}
