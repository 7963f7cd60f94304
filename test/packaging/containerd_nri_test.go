package packaging

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/internal/nriplugin"
)

// checkContainerdNRIConfig checks the containerd settings the
// containerd-nri overlay ships (containerd-nri.toml in dir) against the
// plugin's --nri-socket, and the README's pod annotation requiring it.
func checkContainerdNRIConfig(t *testing.T, dir, sock, readme string) {
	t.Helper()
	// The shipped containerd settings: NRI on, on the socket the plugin
	// dials, and the default validator enabled without the options that
	// would refuse the plugin's own adjustment.
	data, err := os.ReadFile(filepath.Join(dir, "containerd-nri.toml"))
	if err != nil {
		t.Fatal(err)
	}
	toml := tomlKeys(t, string(data))
	const nriSection = "plugins.'io.containerd.nri.v1.nri'"
	for key, want := range map[string]string{
		"version":                                "3",
		nriSection + ".disable":                  "false",
		nriSection + ".socket_path":              "'" + sock + "'",
		nriSection + ".default_validator.enable": "true",
	} {
		if got := toml[key]; got != want {
			t.Errorf("containerd-nri.toml: %s = %q, want %q", key, got, want)
		}
	}
	for key := range toml {
		if strings.HasPrefix(key, nriSection+".default_validator.") && key != nriSection+".default_validator.enable" {
			t.Errorf("containerd-nri.toml sets %s: the recommended setting is the pod annotation, not a node-wide rule", key)
		}
	}
	// The README's pod requires the plugin by the name it registers with.
	want := `required-plugins.noderesource.dev/pod: '["` + nriplugin.Name + `"]'`
	if !strings.Contains(readme, want) {
		t.Errorf("README.md lacks %s", want)
	}
}

// tomlKeys reads the flat key = value lines of a simple TOML file into
// "section.key" (top-level keys bare), values as written.
func tomlKeys(t *testing.T, text string) map[string]string {
	t.Helper()
	keys := map[string]string{}
	section := ""
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			section = strings.Trim(line, "[]")
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("TOML line %q", line)
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if section != "" {
			k = section + "." + k
		}
		keys[k] = v
	}
	return keys
}
