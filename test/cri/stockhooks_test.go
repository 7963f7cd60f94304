package cri

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containers/common/pkg/hooks"
	"gopkg.in/yaml.v3"

	"github.com/noderesource/spiffe-oci-hook/internal/audit"
)

// TestCRIOStockHooks: CRI-O with its stock hooks configuration (no
// hooks_dir, no drop-in) runs the hook as the kustomize base and the chart
// (runtime: crio) install it: the ConfigMap's JSON, byte for byte, written
// into the host directory their DaemonSet mounts for it, with the binary
// and the node config where their installer puts them. CRI-O watches its
// hooks directory, so the hook applies to the next container, without a
// CRI-O restart. First the same JSON in /etc/containers/oci/hooks.d, where
// earlier manifests wrote it: stock CRI-O never reads it, and the
// annotated container starts without its identity, which is the defect
// the base's directory fixes.
func TestCRIOStockHooks(t *testing.T) {
	requireTools(t)
	hostDir, js := baseHooksInstall(t)
	if hostDir != hooks.DefaultDir {
		t.Fatalf("the kustomize base installs the hooks JSON into %s; stock CRI-O reads only %s", hostDir, hooks.DefaultDir)
	}
	n := newNode(t, tempDir(t, "cri-node-"))
	d := tempDir(t, "cri-stock-")
	h := crioHosts{
		hooksDir: filepath.Join(d, "hooks.d"),
		override: filepath.Join(d, "etc-hooks.d"),
		hookBin:  filepath.Join(d, "bin"),
		config:   filepath.Join(d, "etc"),
	}
	for _, dir := range []string{h.hooksDir, h.override, h.hookBin, h.config} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	r := startCRIOWith(t, n, h)

	// spiffe-oci-hook-direct, the delegate, is attested beside the hook
	// the JSON names.
	var doc struct {
		Hook struct {
			Path string `json:"path"`
		} `json:"hook"`
	}
	if err := json.Unmarshal(js, &doc); err != nil {
		t.Fatalf("the ConfigMap's hooks JSON: %v", err)
	}
	n.spire.CreateEntry(t, hookID, []string{"unix:uid:0", "unix:path:" + filepath.Join(filepath.Dir(doc.Hook.Path), "spiffe-oci-hook-direct")}, time.Hour)
	id := n.register(t, "stock", "default", time.Hour)
	bin, err := os.ReadFile(n.hookBin)
	if err != nil {
		t.Fatal(err)
	}
	direct, err := os.ReadFile(filepath.Join(filepath.Dir(n.hookBin), "spiffe-oci-hook-direct"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := os.ReadFile(n.config)
	if err != nil {
		t.Fatal(err)
	}
	// The installer's order: the binaries, the node config, the JSON last,
	// each written aside and renamed into place.
	installFile(t, filepath.Join(h.hookBin, "spiffe-oci-hook-direct"), direct, 0o755)
	installFile(t, filepath.Join(h.hookBin, filepath.Base(doc.Hook.Path)), bin, 0o755)
	installFile(t, filepath.Join(h.config, "config.yaml"), cfg, 0o644)

	installFile(t, filepath.Join(h.override, "spiffe-oci-hook.json"), js, 0o644)
	time.Sleep(time.Second) // as long as the wait below: CRI-O had the same chance to see it
	before := r.runPod(t, "before", "stock", unnamed)
	c := before.mustRun(t, "app", 0, "ls /certs 2>&1; echo DONE; "+idle)
	if out := c.waitLog(t, "DONE"); !strings.Contains(out, "No such file") {
		t.Fatalf("with the JSON only in %s, the container saw /certs:\n%s", hooks.OverrideDir, out)
	}
	// The defect the default install had, as an operator sees it: the
	// node's audit reports the container that started without its
	// identity, and says the runtime never ran the hook.
	n.expected.Store(c.id, true)
	if u := n.waitUnserved(t, c.id); u.Cause != audit.CauseHookNotConfigured {
		t.Errorf("audit finding %+v, want cause %s", u, audit.CauseHookNotConfigured)
	}
	c.stop(t)
	before.remove()
	if err := os.Remove(filepath.Join(h.override, "spiffe-oci-hook.json")); err != nil {
		t.Fatal(err)
	}

	installFile(t, filepath.Join(h.hooksDir, "spiffe-oci-hook.json"), js, 0o644)
	written := time.Now()
	// CRI-O's hooks monitor (containers/common pkg/hooks, fsnotify) loads
	// the file asynchronously: allow it a moment, never a restart.
	for attempt := 0; ; attempt++ {
		p := r.runPod(t, "after", "stock", unnamed)
		c := p.mustRun(t, "app", 0, "if [ -e /certs/svid.pem ]; then "+printCert+"fi; echo DONE")
		out := c.waitLog(t, "DONE")
		if strings.Contains(out, "=== cert ===") {
			if got := certID(t, out); got != id {
				t.Errorf("the container read %s, want %s", got, id)
			}
			t.Logf("the hook ran for a container created %s after the JSON was written (attempt %d), CRI-O not restarted",
				time.Since(written).Round(10*time.Millisecond), attempt)
			break
		}
		p.remove()
		if time.Since(written) > 5*time.Second {
			t.Fatalf("5s after the JSON was written to CRI-O's default hooks directory, containers still start without their files")
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// baseHooksInstall returns where the kustomize base's DaemonSet installs
// the hooks JSON on the host (the hostPath of its host-hooks-d volume) and
// the JSON itself (its ConfigMap's spiffe-oci-hook.json).
func baseHooksInstall(t *testing.T) (string, []byte) {
	t.Helper()
	base := filepath.Join(repoRoot, "deploy", "kubernetes", "base")
	var ds struct {
		Spec struct {
			Template struct {
				Spec struct {
					Volumes []struct {
						Name     string `yaml:"name"`
						HostPath struct {
							Path string `yaml:"path"`
						} `yaml:"hostPath"`
					} `yaml:"volumes"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	for file, v := range map[string]any{"daemonset.yaml": &ds, "configmap.yaml": &cm} {
		data, err := os.ReadFile(filepath.Join(base, file))
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(data, v); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
	}
	dir := ""
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Name == "host-hooks-d" {
			dir = v.HostPath.Path
		}
	}
	js, ok := cm.Data["spiffe-oci-hook.json"]
	if dir == "" || !ok {
		t.Fatalf("the base has no host-hooks-d volume (%q) or no spiffe-oci-hook.json in its ConfigMap", dir)
	}
	return dir, []byte(js)
}

// installFile writes data aside and renames it into place, as the
// DaemonSet's installer does.
func installFile(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".new")
	if err := os.WriteFile(tmp, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}
