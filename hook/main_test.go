package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// criAnnotations are what containerd's CRI puts into a pod container's
// config.json; a pod's own annotations are there only when its runtime
// handler's pod_annotations allows them.
var criAnnotations = map[string]string{
	"io.kubernetes.cri.container-type": "container",
	"io.kubernetes.cri.container-name": "app",
	"io.kubernetes.cri.sandbox-id":     "5d0c6f0e",
}

func runHook(t *testing.T, ann map[string]string, args ...string) (int, string) {
	t.Helper()
	dir := t.TempDir()
	spec, _ := json.Marshal(map[string]any{"root": map[string]any{"path": "rootfs"}, "process": map[string]any{}, "annotations": ann})
	if err := os.WriteFile(filepath.Join(dir, "config.json"), spec, 0o644); err != nil {
		t.Fatal(err)
	}
	state, _ := json.Marshal(map[string]any{"ociVersion": "1.2.1", "id": "ctr1", "status": "created", "pid": os.Getpid(), "bundle": dir, "annotations": ann})
	var stderr bytes.Buffer
	cmd := command()
	cmd.Fallback = nil // it would replace the test's process
	code := cmd.Run(append(args, "createRuntime"), bytes.NewReader(state), &stderr)
	return code, stderr.String()
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestDroppedPodAnnotation: NRI's hook-injector ran the hook for a
// containerd container whose pod asked, but containerd's pod_annotations
// did not let the annotation into the spec. The container is refused with
// one line that names the fix; fail-open lets it start, saying so.
func TestDroppedPodAnnotation(t *testing.T) {
	code, out := runHook(t, criAnnotations, "--config", writeConfig(t, "failure_policy: fail-closed\n"))
	if code == 0 {
		t.Fatalf("exit 0: a containerd container whose pod annotation was dropped would run without its identity")
	}
	if strings.Count(out, "\n") != 1 || !strings.Contains(out, "container ctr1:") || !strings.Contains(out, "pod_annotations") || !strings.Contains(out, "spiffe-oci-nri") {
		t.Errorf("want one line naming the container and the fix, got:\n%s", out)
	}
	t.Logf("fail-closed: %s", out)

	// The fail-open start leaves a trace for the refresher's audit in the
	// state directory (tmpfs: /dev/shm is one everywhere).
	state, err := os.MkdirTemp("/dev/shm", "hook-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	code, out = runHook(t, criAnnotations, "--config", writeConfig(t, "failure_policy: fail-open\nstate_dir: "+state+"\n"))
	if code != 0 || strings.Count(out, "\n") != 1 || !strings.Contains(out, "WITHOUT an identity") || !strings.Contains(out, "pod_annotations") {
		t.Errorf("fail-open: exit %d, output:\n%s", code, out)
	}
	traces, err := statedir.Store{Dir: state}.FailOpens()
	if err != nil || len(traces) != 1 || traces[0].ID != "ctr1" || traces[0].PID != os.Getpid() || !strings.Contains(traces[0].Error, "pod_annotations") {
		t.Errorf("fail-open traces = %+v, %v; want ctr1's, with its pid and error", traces, err)
	}
}

// TestNotAsked: containers that did not ask exit 0 with no output and
// without reading the node configuration (a --config that does not exist
// would fail the hook if it were read).
func TestNotAsked(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.yaml")
	sandbox := map[string]string{"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "5d0c6f0e"}
	sidecar := map[string]string{
		"io.kubernetes.cri.container-type":        "container",
		"io.kubernetes.cri.container-name":        "sidecar",
		"identity.noderesource.dev/container.app": "- cert_dir: /certs\n",
	}
	for name, ann := range map[string]map[string]string{
		"direct runc, no annotations":                nil,
		"containerd sandbox":                         sandbox,
		"containerd container another one asked for": sidecar,
	} {
		t.Run(name, func(t *testing.T) {
			if code, out := runHook(t, ann, "--config", missing); code != 0 || out != "" {
				t.Errorf("exit %d, output %q", code, out)
			}
		})
	}
	// The same --config does fail a container that asked.
	if code, _ := runHook(t, criAnnotations, "--config", missing); code == 0 {
		t.Error("the missing --config was not read for a container that asked")
	}
}
