package packaging

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// cpioEntry is one member of a "newc" (SVR4) cpio archive, the format
// rpm2cpio writes.
type cpioEntry struct {
	name string
	mode uint32
	data []byte
}

// readCPIO reads a newc cpio archive (no cpio(1) needed).
func readCPIO(r io.Reader) ([]cpioEntry, error) {
	br := bufio.NewReader(r)
	var out []cpioEntry
	var off int64
	read := func(n int64) ([]byte, error) {
		b := make([]byte, n)
		_, err := io.ReadFull(br, b)
		off += n
		return b, err
	}
	pad := func() error {
		if m := off % 4; m != 0 {
			_, err := read(4 - m)
			return err
		}
		return nil
	}
	for {
		hdr, err := read(110)
		if err != nil {
			return nil, fmt.Errorf("cpio header at %d: %w", off, err)
		}
		if magic := string(hdr[:6]); magic != "070701" && magic != "070702" {
			return nil, fmt.Errorf("cpio: bad magic %q at %d", magic, off-110)
		}
		field := func(i int) (uint64, error) {
			return strconv.ParseUint(string(hdr[6+8*i:14+8*i]), 16, 32)
		}
		mode, err1 := field(1)
		size, err2 := field(6)
		namesize, err3 := field(11)
		if err := cmpErr(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("cpio header: %w", err)
		}
		name, err := read(int64(namesize))
		if err != nil {
			return nil, err
		}
		if err := pad(); err != nil {
			return nil, err
		}
		data, err := read(int64(size))
		if err != nil {
			return nil, err
		}
		if err := pad(); err != nil {
			return nil, err
		}
		n := strings.TrimRight(string(name), "\x00")
		if n == "TRAILER!!!" {
			return out, nil
		}
		out = append(out, cpioEntry{name: "/" + strings.TrimPrefix(n, "./"), mode: uint32(mode), data: data})
	}
}

func cmpErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// TestRPM: `make rpm` builds from a git archive of the tree with the version
// passed in, and the rpm holds exactly the package's files; its hooks.d JSON
// names the hook binary at the path the payload has it, and loads the way
// runtimes load it; the unit is handled by systemd scriptlets; the node
// config is %config(noreplace).
func TestRPM(t *testing.T) {
	if testing.Short() {
		t.Skip("builds an rpm")
	}
	needTools(t, "make", "go", "git", "rpmbuild", "rpm", "rpm2cpio")
	needWritableRepo(t)
	root := testhelp.RepoRoot(t)
	const version = "v1.2.3-pkgtest"
	const rpmVersion = "1.2.3.pkgtest"
	run(t, root, "make", "rpm", "VERSION="+version)

	rpms, _ := filepath.Glob(filepath.Join(root, "rpm", "build", "RPMS", "*", "spiffe-oci-hook-"+rpmVersion+"-1*.rpm"))
	if len(rpms) != 1 {
		t.Fatalf("rpm/build/RPMS holds %q, want one spiffe-oci-hook-%s rpm", rpms, rpmVersion)
	}
	pkg := rpms[0]
	if srpms, _ := filepath.Glob(filepath.Join(root, "rpm", "build", "SRPMS", "spiffe-oci-hook-"+rpmVersion+"-1*.src.rpm")); len(srpms) != 1 {
		t.Errorf("no source rpm: %q", srpms)
	}
	// The tarball is a git archive: it holds tracked files and no ignored ones.
	tarballs, _ := filepath.Glob(filepath.Join(root, "rpm", "build", "SOURCES", "spiffe-oci-hook-"+rpmVersion+".tar.gz"))
	if len(tarballs) != 1 {
		t.Fatalf("no source tarball in rpm/build/SOURCES")
	}
	if names := run(t, root, "tar", "-tzf", tarballs[0]); !strings.Contains(names, "spiffe-oci-hook-"+rpmVersion+"/go.mod\n") ||
		!strings.Contains(names, "spiffe-oci-hook-"+rpmVersion+"/rpm/spiffe-oci-hook.spec\n") ||
		strings.Contains(names, "/bin/spiffe-oci-hook\n") || strings.Contains(names, "/rpm/build/") {
		t.Errorf("source tarball contents unexpected:\n%s", names)
	}

	if got := run(t, root, "rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{LICENSE}", pkg); got != "spiffe-oci-hook "+rpmVersion+" Apache-2.0" {
		t.Errorf("rpm name/version/license = %q", got)
	}

	// The file list, directories included.
	files := strings.Fields(run(t, root, "rpm", "-qlp", pkg))
	want := sorted(append([]string{
		"/etc/spiffe-oci-hook",
		rpmConfigPath,
		rpmRefresherPath,
		rpmUnitPath,
		rpmTmpfilesPath,
		rpmHookPath,
		rpmHookDirect,
		rpmHooksJSON,
		"/usr/share/doc/spiffe-oci-hook",
		"/usr/share/licenses/spiffe-oci-hook",
	}, docFiles(t, "/usr/share/doc/spiffe-oci-hook", "/usr/share/licenses/spiffe-oci-hook")...))
	// rpm lists the docs/ directory the pages are in, too.
	if slices.ContainsFunc(want, func(f string) bool { return strings.HasPrefix(f, "/usr/share/doc/spiffe-oci-hook/docs/") }) {
		want = sorted(append(want, "/usr/share/doc/spiffe-oci-hook/docs"))
	}
	if !slices.Equal(sorted(files), want) {
		t.Errorf("rpm -qlp:\n  %q\nwant\n  %q", sorted(files), want)
	}

	// The config is %config(noreplace): flag c (config) and n (noreplace).
	if got := strings.Fields(run(t, root, "rpm", "-qp", "--configfiles", pkg)); !slices.Equal(got, []string{rpmConfigPath}) {
		t.Errorf("rpm --configfiles = %q, want [%s]", got, rpmConfigPath)
	}
	flags := map[string]string{}
	for _, line := range strings.Split(run(t, root, "rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", pkg), "\n") {
		if name, f, ok := strings.Cut(line, " "); ok {
			flags[name] = f
		}
	}
	if f := flags[rpmConfigPath]; !strings.Contains(f, "c") || !strings.Contains(f, "n") {
		t.Errorf("%s file flags %q, want config and noreplace (c, n)", rpmConfigPath, f)
	}
	if f := flags["/usr/share/licenses/spiffe-oci-hook/LICENSE"]; !strings.Contains(f, "l") {
		t.Errorf("LICENSE file flags %q, want license (l)", f)
	}

	// Scriptlets: enable per preset on install, stop and disable on erase,
	// restart on upgrade.
	scripts := run(t, root, "rpm", "-qp", "--scripts", pkg)
	sections := map[string]string{}
	var cur string
	for _, line := range strings.Split(scripts, "\n") {
		if i := strings.Index(line, " scriptlet (using "); i > 0 && !strings.HasPrefix(line, " ") {
			cur = line[:i]
			continue
		}
		sections[cur] += line + "\n"
	}
	for sec, words := range map[string][]string{
		"postinstall":   {"spiffe-oci-refresher.service"},
		"preuninstall":  {"spiffe-oci-refresher.service"},
		"postuninstall": {"spiffe-oci-refresher.service"},
	} {
		body := sections[sec]
		for _, w := range words {
			if !strings.Contains(body, w) {
				t.Errorf("%s scriptlet lacks %q:\n%s", sec, w, scripts)
			}
		}
		if !strings.Contains(body, "systemctl") && !strings.Contains(body, "systemd-update-helper") {
			t.Errorf("%s scriptlet does not call systemd:\n%s", sec, body)
		}
	}
	if !containsAny(sections["postinstall"], "preset", "install-system-units") {
		t.Errorf("postinstall does not apply the preset:\n%s", sections["postinstall"])
	}
	if !strings.Contains(sections["postinstall"], "systemd-tmpfiles --create") || !strings.Contains(sections["postinstall"], "spiffe-oci-hook.conf") {
		t.Errorf("postinstall does not create the state directory (systemd-tmpfiles --create spiffe-oci-hook.conf):\n%s", sections["postinstall"])
	}
	if !containsAny(sections["preuninstall"], "disable", "remove-system-units") {
		t.Errorf("preuninstall does not disable the unit:\n%s", sections["preuninstall"])
	}
	if !containsAny(sections["postuninstall"], "try-restart", "mark-restart-system-units") {
		t.Errorf("postuninstall does not restart the unit on upgrade:\n%s", sections["postuninstall"])
	}

	// The payload: the JSON names the hook at the path the payload has it.
	cmd := exec.Command("rpm2cpio", pkg)
	var cpio, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &cpio, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("rpm2cpio: %v: %s", err, stderr.String())
	}
	entries, err := readCPIO(&cpio)
	if err != nil {
		t.Fatal(err)
	}
	payload := map[string]cpioEntry{}
	for _, e := range entries {
		payload[e.name] = e
	}
	js, ok := payload[rpmHooksJSON]
	if !ok {
		t.Fatalf("payload has no %s", rpmHooksJSON)
	}
	hookPath := hookJSONPath(t, js.data)
	if hookPath != rpmHookPath {
		t.Errorf("rpm JSON: hook.path %q, want %q", hookPath, rpmHookPath)
	}
	hook, ok := payload[hookPath]
	if !ok || hook.mode&0o170000 != 0o100000 || hook.mode&0o111 == 0 {
		t.Fatalf("payload has no executable file at the JSON's hook.path %s (mode %o)", hookPath, hook.mode)
	}
	extracted := filepath.Join(t.TempDir(), "spiffe-oci-hook")
	if err := os.WriteFile(extracted, hook.data, 0o755); err != nil {
		t.Fatal(err)
	}
	readHooksJSON(t, "rpm JSON", js.data, extracted)
	if !bytes.Equal(js.data, repoHooksJSON(t, rpmHookPath)) {
		t.Errorf("rpm JSON differs from hooks.d/spiffe-oci-hook.json:\n%s", js.data)
	}
	if got := binaryVersion(t, extracted); got != "spiffe-oci-hook "+version {
		t.Errorf("packaged hook --version = %q, want %q", got, "spiffe-oci-hook "+version)
	}

	// The unit starts the refresher the payload has, with the payload's config.
	unit, ok := payload[rpmUnitPath]
	if !ok {
		t.Fatalf("payload has no %s", rpmUnitPath)
	}
	args := execStartArgs(t, unit.data)
	if want := []string{rpmRefresherPath, "--config", rpmConfigPath}; !slices.Equal(args, want) {
		t.Errorf("rpm unit ExecStart %q, want %q", args, want)
	}
	if e, ok := payload[args[0]]; !ok || e.mode&0o111 == 0 {
		t.Errorf("payload has no executable %s", args[0])
	}
	if tf, ok := payload[rpmTmpfilesPath]; !ok || !bytes.Equal(tf.data, repoTmpfiles(t)) {
		t.Errorf("payload %s differs from tmpfiles.d/spiffe-oci-hook.conf", rpmTmpfilesPath)
	}
	cfg, ok := payload[rpmConfigPath]
	shipped, _ := os.ReadFile(filepath.Join(root, "deploy", "config.yaml"))
	if !ok || !bytes.Equal(cfg.data, shipped) {
		t.Errorf("payload %s differs from deploy/config.yaml", rpmConfigPath)
	}
}

func containsAny(s string, words ...string) bool {
	for _, w := range words {
		if strings.Contains(s, w) {
			return true
		}
	}
	return false
}
