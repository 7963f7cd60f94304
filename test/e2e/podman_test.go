package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// renderHooksDir writes the repo's hooks.d JSON into a fresh directory,
// pointing at the test's hook binary and node configuration, the way
// `make install` renders it for the installed path.
func renderHooksDir(t *testing.T, config string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, "hooks.d", "spiffe-oci-hook.json"))
	if err != nil {
		t.Fatal(err)
	}
	var h map[string]any
	if err := json.Unmarshal(data, &h); err != nil {
		t.Fatal(err)
	}
	hook := h["hook"].(map[string]any)
	hook["path"] = hookBin
	hook["args"] = []string{"spiffe-oci-hook", "--config", config}
	out, _ := json.MarshalIndent(h, "", "  ")
	dir := filepath.Join(shortTempDir(t), "hooks.d")
	os.MkdirAll(dir, 0o755)
	if err := os.WriteFile(filepath.Join(dir, "spiffe-oci-hook.json"), out, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// podman runs a container on rootfs with Podman, using runc and this
// machine's settings (cgroupfs, no rlimit raises, no network).
func podman(t *testing.T, store, hooksDir, rootfs string, args ...string) (string, error) {
	t.Helper()
	base := []string{
		"--root", filepath.Join(store, "root"), "--runroot", filepath.Join(store, "runroot"),
		"--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
		"run", "--rm", "--network", "none",
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
		"--hooks-dir", hooksDir,
	}
	cmd := exec.Command("podman", append(append(base, args[:len(args)-1]...), "--rootfs", rootfs, "/bin/sh", "-c", args[len(args)-1])...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// printSPIFFEID is a busybox script that prints the SPIFFE ID of the first
// certificate in /certs/svid.pem: it decodes the PEM and reads the DER's
// URI SAN (context tag 0x86, a length byte, then "spiffe://...").
const printSPIFFEID = `sed -n '1,/END CERTIFICATE/p' /certs/svid.pem | grep -v -- ----- | base64 -d | od -An -v -tx1 | awk '
function hex(h) { return (index("0123456789abcdef", substr(h, 1, 1)) - 1) * 16 + index("0123456789abcdef", substr(h, 2, 1)) - 1 }
{ for (i = 1; i <= NF; i++) b[n++] = $i }
END { for (i = 0; i < n - 4; i++) if (b[i] == "86" && b[i+2] == "73" && b[i+3] == "70" && b[i+4] == "69") { l = hex(b[i+1]); s = ""; for (j = 0; j < l; j++) s = s sprintf("%c", hex(b[i+2+j])); print s; exit } }'`

// TestPodman: `podman run --hooks-dir ... --annotation` gives the container
// its SVID; without the annotation the hook does nothing.
func TestPodman(t *testing.T) {
	e := newEnv(t)
	hooksDir := renderHooksDir(t, e.config)
	store := shortTempDir(t)
	rootfs := filepath.Join(shortTempDir(t), "rootfs")
	makeBusyboxRootfs(t, rootfs)

	out, err := podman(t, store, hooksDir, rootfs, "--annotation", annotation+"=- cert_dir: /certs", printSPIFFEID)
	if err != nil {
		t.Fatalf("podman run: %v\n%s", err, out)
	}
	if got := strings.TrimSpace(out); got != workloadID {
		t.Errorf("the container printed %q, want its SPIFFE ID %s", got, workloadID)
	}
	// Podman runs poststop hooks when the container is removed.
	if got := e.listState(); !slices.Equal(got, emptyState) {
		t.Errorf("after the container exited the state directory holds %v", got)
	}

	// A key quoted for Podman 4 and kept so by Podman 5: the container
	// asked for an identity, so it must not start without one.
	out, err = podman(t, store, hooksDir, rootfs, "--annotation", quotedKeyArg(t, annotation+"=- cert_dir: /certs"), "echo STARTED")
	if err == nil || strings.Contains(out, "STARTED") {
		t.Errorf("a container whose identity annotation key begins with a quote started: %v\n%s", err, out)
	}
	if !strings.Contains(out, "begins with a double quote") {
		t.Errorf("podman's error does not carry the hook's line:\n%s", out)
	}

	// Without the annotation: no files, and the hook never ran (it would
	// have created the state directory's records folder).
	for _, d := range []string{"records", "containers", "locks"} {
		os.RemoveAll(filepath.Join(e.stateDir, d))
	}
	out, err = podman(t, store, hooksDir, rootfs, "test -e /certs/svid.pem && echo HAS-FILES || echo NO-FILES")
	if err != nil {
		t.Fatalf("podman run: %v\n%s", err, out)
	}
	if strings.TrimSpace(out) != "NO-FILES" {
		t.Errorf("without the annotation the container saw %q", out)
	}
	if got := e.listState(); !slices.Equal(got, []string{""}) {
		t.Errorf("without the annotation the hook touched the state directory: %v", got)
	}
}
