package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
)

// podmanConfigAnnotations creates (and initializes, which writes the OCI
// config the hook reads) a Podman container with the given --annotation
// arguments and returns the annotations of its config.json.
func podmanConfigAnnotations(t *testing.T, annotationArgs ...string) map[string]string {
	t.Helper()
	store := podmanStore(t)
	rootfs := filepath.Join(shortTempDir(t), "rootfs")
	makeBusyboxRootfs(t, rootfs)
	global := []string{"--root", filepath.Join(store, "root"), "--runroot", filepath.Join(store, "runroot"),
		"--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"}
	name := filepath.Base(store)
	args := append(append([]string{}, global...), "create", "--name", name, "--network", "none",
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
	for _, a := range annotationArgs {
		args = append(args, "--annotation", a)
	}
	args = append(args, "--rootfs", rootfs, "/bin/sh", "-c", "true")
	if out, err := exec.Command("podman", args...).CombinedOutput(); err != nil {
		t.Fatalf("podman create: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("podman", append(append([]string{}, global...), "rm", "-f", name)...).Run() })
	if out, err := exec.Command("podman", append(append([]string{}, global...), "init", name)...).CombinedOutput(); err != nil {
		t.Fatalf("podman init: %v\n%s", err, out)
	}
	configs, _ := filepath.Glob(filepath.Join(store, "*", "*-containers", "*", "userdata", "config.json"))
	if len(configs) != 1 {
		t.Fatalf("found OCI configs %q, want one", configs)
	}
	data, err := os.ReadFile(configs[0])
	if err != nil {
		t.Fatal(err)
	}
	var spec struct {
		Annotations map[string]string `json:"annotations"`
	}
	if err := json.Unmarshal(data, &spec); err != nil {
		t.Fatal(err)
	}
	return spec.Annotations
}

// TestPodmanAnnotationCSV pins what docs/podman.md warns
// about. Podman 4.3 reads each --annotation as one CSV record (a pflag
// StringSlice; Podman 5.0 made it a StringArray): a newline ends the value,
// so a block-style YAML list silently loses every line after its first; an
// unquoted comma splits it, so podman refuses a flow-style list with two
// fields; and double quotes around the whole KEY=VALUE keep both. If a newer
// Podman keeps the lines, this test fails: update docs/podman.md and this test.
func TestPodmanAnnotationCSV(t *testing.T) {
	requireRoot(t)
	const (
		block = "- cert_dir: /certs\n  svid_file_name: cert.pem\n"
		flow  = "[{cert_dir: /certs, svid_file_name: cert.pem}]"
	)
	got := podmanConfigAnnotations(t,
		"example.com/lines=line1\nline2",
		annotation+"="+block,
		annotation+".one=[{cert_dir: /certs}]",
		`"`+annotation+`.flow=`+flow+`"`,
		`"`+annotation+`.block=`+block+`"`)

	if v := got["example.com/lines"]; v != "line1" {
		t.Errorf("--annotation 'k=line1<newline>line2' arrived as %q, want only %q (Podman 4.3); if Podman now keeps the lines, update docs/podman.md", v, "line1")
	}
	if v := got[annotation]; v != "- cert_dir: /certs" {
		t.Errorf("block-style value arrived as %q, want its first line only", v)
	}
	// What the hook makes of it: a valid delivery that lost its file name.
	ds, err := annotations.Parse(annotation, got[annotation])
	if err != nil || len(ds) != 1 || ds[0].SVIDFileName == "cert.pem" {
		t.Errorf("block style after Podman: %+v, %v; want one delivery that lost svid_file_name", ds, err)
	}
	if v := got[annotation+".one"]; v != "[{cert_dir: /certs}]" {
		t.Errorf("flow style without a comma arrived as %q", v)
	}
	// Quoted as one CSV field, both styles arrive whole.
	for key, want := range map[string]string{annotation + ".flow": flow, annotation + ".block": block} {
		if got[key] != want {
			t.Errorf("quoted %s arrived as %q, want %q", key, got[key], want)
		}
		ds, err := annotations.Parse(annotation, got[key])
		if err != nil || len(ds) != 1 || ds[0].CertDir != "/certs" || ds[0].SVIDFileName != "cert.pem" {
			t.Errorf("quoted %s: %+v, %v; want cert_dir /certs and svid_file_name cert.pem", key, ds, err)
		}
	}

	// An unquoted comma: Podman refuses the container.
	store := podmanStore(t)
	out, err := exec.Command("podman", "--root", filepath.Join(store, "root"), "--runroot", filepath.Join(store, "runroot"),
		"create", "--annotation", annotation+"="+flow, "--rootfs", "/nonexistent", "/bin/sh").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "KEY=VALUE") {
		t.Errorf("podman create with an unquoted comma in --annotation: %v\n%s\nwant Podman 4.3's \"annotations must be formatted KEY=VALUE\"", err, out)
	}
}
