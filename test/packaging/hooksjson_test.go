// Package packaging checks the files the project installs outside Go code.
package packaging

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	current "github.com/containers/common/pkg/hooks/1.0.0"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// hookDefaultTimeout is the hook's own default timeout in seconds; the
// runtime's must be larger so that the hook, not the runtime, reports a
// slow agent.
var hookDefaultTimeout = int(config.Default().Timeout.Seconds())

// loadHook reads hooks.d/spiffe-oci-hook.json the way CRI-O and Podman do
// (readHooksJSON), with hook.path replaced by an executable that exists
// here.
func loadHook(t *testing.T) *current.Hook {
	t.Helper()
	src := filepath.Join(testhelp.RepoRoot(t), "hooks.d", "spiffe-oci-hook.json")
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if p := hookJSONPath(t, data); p != "/usr/libexec/oci/hooks.d/spiffe-oci-hook" {
		t.Errorf("hook.path = %q", p)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return readHooksJSON(t, src, data, exe)
}

func TestHookJSON(t *testing.T) {
	h := loadHook(t)
	if h.Version != "1.0.0" {
		t.Fatalf("version = %q, want 1.0.0", h.Version)
	}
	if want := []string{"createRuntime", "poststop"}; !slices.Equal(h.Stages, want) {
		t.Fatalf("stages = %q, want %q", h.Stages, want)
	}
	if h.Hook.Timeout == nil {
		t.Fatal("hook.timeout is not set")
	}
	if *h.Hook.Timeout <= hookDefaultTimeout {
		t.Fatalf("hook.timeout = %d, want more than the hook's own %ds", *h.Hook.Timeout, hookDefaultTimeout)
	}
	if len(h.Hook.Args) == 0 || h.Hook.Args[0] != "spiffe-oci-hook" {
		t.Fatalf("hook.args = %q", h.Hook.Args)
	}
	if h.When.Always != nil || h.When.HasBindMounts != nil || len(h.When.Commands) != 0 {
		t.Fatalf("when has conditions beside annotations: %+v", h.When)
	}
}

func TestHookWhen(t *testing.T) {
	h := loadHook(t)
	spec := &specs.Spec{Process: &specs.Process{Args: []string{"/bin/sh"}}}
	const yamlValue = "- cert_dir: /var/certs\n"
	tests := []struct {
		name        string
		annotations map[string]string
		want        bool
	}{
		{"unnamed key with YAML", map[string]string{"identity.noderesource.dev/container": yamlValue}, true},
		{"named key with multi-line YAML", map[string]string{
			"io.kubernetes.container.name":            "web",
			"identity.noderesource.dev/container.web": "- cert_dir: /var/certs\n  svid_file_name: tls.crt\n- cert_dir: /run/other\n",
		}, true},
		{"named key with dashes and dots", map[string]string{"identity.noderesource.dev/container.my-app.v2": yamlValue}, true},
		{"among other annotations", map[string]string{
			"io.kubernetes.pod.name":              "p",
			"identity.noderesource.dev/container": yamlValue,
			"io.kubernetes.container.name":        "c",
		}, true},
		{"no annotations", nil, false},
		{"empty annotations", map[string]string{}, false},
		{"only the container name", map[string]string{"io.kubernetes.container.name": "web"}, false},
		{"empty value", map[string]string{"identity.noderesource.dev/container": ""}, false},
		{"look-alike prefix", map[string]string{"xidentity.noderesource.dev/container": yamlValue}, false},
		{"look-alike suffix", map[string]string{"identity.noderesource.dev/containers": yamlValue}, false},
		{"unescaped dot look-alike", map[string]string{"identityXnoderesource.dev/container": yamlValue}, false},
		{"other domain", map[string]string{"identity.noderesource.dev.evil/container": yamlValue}, false},
		{"empty name", map[string]string{"identity.noderesource.dev/container.": yamlValue}, false},
		{"name with slash", map[string]string{"identity.noderesource.dev/container.a/b": yamlValue}, false},
		{"name starting with a dot", map[string]string{"identity.noderesource.dev/container..x": yamlValue}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := h.When.Match(spec, tt.annotations, false)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("Match(%q) = %v, want %v", tt.annotations, got, tt.want)
			}
		})
	}
}
