package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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

// podmanMajor is the major version of the podman on this machine.
func podmanMajor(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("podman", "version", "--format", "{{.Client.Version}}").Output()
	if err != nil {
		t.Fatalf("podman version: %v", err)
	}
	v := strings.TrimSpace(string(out))
	major, err := strconv.Atoi(strings.SplitN(v, ".", 2)[0])
	if err != nil {
		t.Fatalf("podman version %q: %v", v, err)
	}
	return major
}

// quotedKeyArg is the --annotation argument that leaves a double quote at
// the start of the key, on this machine's podman: what Podman 5 makes of
// '"KEY=VALUE"', the form Podman 4 needed for a value with commas.
func quotedKeyArg(t *testing.T, kv string) string {
	if podmanMajor(t) >= 5 {
		return `"` + kv + `"`
	}
	// Podman 4 reads CSV: a doubled quote inside a quoted field is one.
	return `"""` + kv + `"""`
}

// TestPodmanAnnotation pins what docs/podman.md tells users about
// --annotation, for each major version of Podman. Podman 4 reads each
// --annotation as one CSV record (a pflag StringSlice): a newline ends
// the value, so a block-style YAML list silently loses every line after
// its first; an unquoted comma splits it, so podman refuses a flow-style
// list with two fields; and double quotes around the whole KEY=VALUE keep
// both. Podman 5.0 made it a StringArray (containers/podman ef10073b51,
// "cli: podman run/create --annotation use StringArray()"): every
// argument is taken as written, after the first "=", so newlines and
// commas stay, and so do quotes: '"KEY=VALUE"' gives the key a leading
// quote, which the hook refuses (TestPodman). A Podman whose behaviour
// matches neither fails here: read its source, then update this test and
// docs/podman.md.
func TestPodmanAnnotation(t *testing.T) {
	requireRoot(t)
	major := podmanMajor(t)
	if major != 4 && major != 5 {
		t.Fatalf("Podman %d: this test knows what Podman 4 and 5 do with --annotation; check this one's (cmd/podman/common/create.go) and extend it and docs/podman.md", major)
	}
	const (
		block = "- cert_dir: /certs\n  svid_file_name: cert.pem\n"
		flow  = "[{cert_dir: /certs, svid_file_name: cert.pem}]"
	)
	args := []string{
		"example.com/lines=line1\nline2",
		annotation + "=" + block,
		annotation + ".one=[{cert_dir: /certs}]",
		`"` + annotation + `.flow=` + flow + `"`,
		`"` + annotation + `.block=` + block + `"`,
	}
	if major == 5 {
		args = append(args, annotation+".comma="+flow)
	}
	got := podmanConfigAnnotations(t, args...)
	// parsesWhole: the value is the whole delivery, file name and all.
	parsesWhole := func(what, v string) {
		t.Helper()
		ds, err := annotations.Parse(annotation, v)
		if err != nil || len(ds) != 1 || ds[0].CertDir != "/certs" || ds[0].SVIDFileName != "cert.pem" {
			t.Errorf("%s: %+v, %v; want cert_dir /certs and svid_file_name cert.pem", what, ds, err)
		}
	}
	// Both versions: a value with neither newline, comma nor quote
	// arrives as written.
	if v := got[annotation+".one"]; v != "[{cert_dir: /certs}]" {
		t.Errorf("flow style without a comma arrived as %q", v)
	}
	store := podmanStore(t)
	create := func(arg string) (string, error) {
		out, err := exec.Command("podman", "--root", filepath.Join(store, "root"), "--runroot", filepath.Join(store, "runroot"),
			"create", "--annotation", arg, "--rootfs", "/nonexistent", "/bin/sh").CombinedOutput()
		return string(out), err
	}

	switch major {
	case 4:
		if v := got["example.com/lines"]; v != "line1" {
			t.Errorf("Podman 4: --annotation 'k=line1<newline>line2' arrived as %q, want only %q", v, "line1")
		}
		if v := got[annotation]; v != "- cert_dir: /certs" {
			t.Errorf("Podman 4: block-style value arrived as %q, want its first line only", v)
		}
		// What the hook makes of it: a valid delivery that lost its file name.
		ds, err := annotations.Parse(annotation, got[annotation])
		if err != nil || len(ds) != 1 || ds[0].SVIDFileName == "cert.pem" {
			t.Errorf("Podman 4: block style: %+v, %v; want one delivery that lost svid_file_name", ds, err)
		}
		// Quoted as one CSV field, both styles arrive whole.
		for key, want := range map[string]string{annotation + ".flow": flow, annotation + ".block": block} {
			if got[key] != want {
				t.Errorf("Podman 4: quoted %s arrived as %q, want %q", key, got[key], want)
			}
			parsesWhole("Podman 4: quoted "+key, got[key])
		}
		// An unquoted comma: Podman refuses the container.
		if out, err := create(annotation + "=" + flow); err == nil || !strings.Contains(out, "KEY=VALUE") {
			t.Errorf("Podman 4: podman create with an unquoted comma in --annotation: %v\n%s\nwant \"annotations must be formatted KEY=VALUE\"", err, out)
		}
	case 5:
		if v := got["example.com/lines"]; v != "line1\nline2" {
			t.Errorf("Podman 5: --annotation 'k=line1<newline>line2' arrived as %q, want it whole", v)
		}
		// Block style and an unquoted comma arrive whole.
		if v := got[annotation]; v != block {
			t.Errorf("Podman 5: block-style value arrived as %q, want %q", v, block)
		}
		parsesWhole("Podman 5: block style", got[annotation])
		if v := got[annotation+".comma"]; v != flow {
			t.Errorf("Podman 5: flow style with a comma arrived as %q, want %q", v, flow)
		}
		parsesWhole("Podman 5: flow style", got[annotation+".comma"])
		// Podman 4's quoting stays in the key and the value: the
		// identity annotation is not there, a misquoted one is.
		for _, name := range []string{".flow", ".block"} {
			if _, ok := got[annotation+name]; ok {
				t.Errorf("Podman 5: the quoted %s arrived under the plain key", name)
			}
			if _, ok := got[`"`+annotation+name]; !ok {
				t.Errorf("Podman 5: the quoted %s did not arrive under the key with a leading quote: %q", name, got)
			}
		}
		if _, ok := annotations.Misquoted(got); !ok {
			t.Errorf("Podman 5: annotations.Misquoted does not see the quoted keys in %q", got)
		}
	}
}
