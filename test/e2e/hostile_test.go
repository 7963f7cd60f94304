package e2e

// Hostile annotations and hostile images, against the real hook binary and
// SPIRE agent. Whoever writes the pod writes the annotation and the image;
// neither may make the hook read, write or mount anything outside the
// container's rootfs and the hook's own state directory.

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const hostileID = "spiffe://example.org/workload/hostile"

// hostileEnv is newEnv plus an entry for startOriginal's sleep, so that its pid
// gets an identity and cases that get past parsing reach the
// agent, the writer and the mount.
func hostileEnv(t *testing.T) *env {
	e := startEnv(t)
	e.spire.CreateEntry(t, workloadID, []string{"unix:uid:0", "unix:path:" + runcInitPath(t)}, time.Hour)
	sleep, err := filepath.EvalSymlinks("/usr/bin/sleep")
	if err != nil {
		t.Fatal(err)
	}
	e.spire.CreateEntry(t, hostileID, []string{fmt.Sprintf("unix:uid:%d", originalUID), "unix:path:" + sleep}, time.Hour)
	e.waitSynced()
	return e
}

// snapshot records every path under root with its type, mode and a digest
// of regular files' contents and symlinks' targets.
func snapshot(t *testing.T, root string) map[string]string {
	t.Helper()
	m := map[string]string{}
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			m[p] = "error: " + err.Error()
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		v := info.Mode().String()
		switch {
		case info.Mode().IsRegular():
			data, _ := os.ReadFile(p)
			sum := sha256.Sum256(data)
			v += " " + hex.EncodeToString(sum[:8])
		case info.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			v += " -> " + l
		}
		m[strings.TrimPrefix(p, root)] = v
		return nil
	})
	return m
}

func diffSnapshots(before, after map[string]string) []string {
	var d []string
	for p, v := range before {
		if w, ok := after[p]; !ok {
			d = append(d, "removed "+p)
		} else if w != v {
			d = append(d, fmt.Sprintf("changed %s: %s -> %s", p, v, w))
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			d = append(d, "added "+p)
		}
	}
	slices.Sort(d)
	return d
}

// TestHostileAnnotations: each hostile value is refused with one line that
// names the container, the annotation and the fault, quickly, and nothing
// changes in the rootfs, a host directory next to the bundle, the host's
// mounts or the state directory.
func TestHostileAnnotations(t *testing.T) {
	e := hostileEnv(t)
	hostDir := filepath.Join(shortTempDir(t), "host")
	os.MkdirAll(filepath.Join(hostDir, "etc"), 0o755)
	os.WriteFile(filepath.Join(hostDir, "etc", "passwd"), []byte("host file\n"), 0o644)

	long := func(n int) string { return strings.Repeat("a", n) }
	// A list of 10,000 entries in under 64 KiB: one anchored delivery and
	// 9,999 aliases to it.
	aliased := "- &d {cert_dir: /certs}\n" + strings.Repeat("- *d\n", 9999)
	var plain strings.Builder
	for i := range 10000 {
		fmt.Fprintf(&plain, "- cert_dir: /c%d\n", i)
	}
	var seventeen strings.Builder
	for i := range 17 {
		fmt.Fprintf(&seventeen, "- cert_dir: /c%d\n", i)
	}
	// Billion laughs: nine levels of nine aliases each, 9^9 strings if
	// expanded, in a few hundred bytes; once where the strings would end
	// up in a field, once as list items, once under an unknown key.
	bomb := func(indent string) string {
		var b strings.Builder
		b.WriteString(indent + "a0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n")
		for i := 1; i < 9; i++ {
			p := fmt.Sprintf("*a%d", i-1)
			fmt.Fprintf(&b, "%sa%d: &a%d [%s]\n", indent, i, i, strings.Join(slices.Repeat([]string{p}, 9), ","))
		}
		return b.String()
	}
	bombList := "- &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n"
	for i := 1; i < 9; i++ {
		bombList += fmt.Sprintf("- &a%d [%s]\n", i, strings.Join(slices.Repeat([]string{fmt.Sprintf("*a%d", i-1)}, 9), ","))
	}
	bombField := "- cert_dir: /certs\n  x:\n" + bomb("    ") + "  spiffe_id: *a8\n"
	deep := strings.Repeat("[", 30000) + strings.Repeat("]", 30000)
	deepMap := strings.Repeat("{a: ", 10000) + "b" + strings.Repeat("}", 10000)

	cases := []struct {
		name string
		ann  string
		want []string
	}{
		// Path traversal in cert_dir.
		{"cert_dir dot-dot", "- cert_dir: /certs/../../etc\n", []string{"must not contain '..'"}},
		{"cert_dir root dot-dot", "- cert_dir: /..\n", []string{"must not contain '..'"}},
		{"cert_dir trailing dot-dot", "- cert_dir: /certs/..\n", []string{"must not contain '..'"}},
		{"cert_dir relative dot-dot", "- cert_dir: ../../" + hostDir + "\n", []string{"must be an absolute path"}},
		{"cert_dir dot", "- cert_dir: /certs/./x\n", []string{"must be a clean path"}},
		{"cert_dir double slash", "- cert_dir: //certs\n", []string{"must be a clean path"}},
		{"cert_dir slash dot", "- cert_dir: /.\n", []string{"must be a clean path"}},
		{"cert_dir root", "- cert_dir: /\n", []string{"must not be the container's root"}},
		{"cert_dir backslashes", `- cert_dir: '..\..\etc'` + "\n", []string{"must be an absolute path"}},
		{"cert_dir newline", `- cert_dir: "/certs\n/etc"` + "\n", []string{"holds control"}},
		{"cert_dir right-to-left override", "- cert_dir: \"/certs/\\u202etxt.pem\"\n", []string{"holds control, format"}},
		{"cert_dir NUL escape", `- cert_dir: "/certs\0"` + "\n", []string{"holds control"}},
		{"cert_dir binary", "- cert_dir: !!binary " + base64.StdEncoding.EncodeToString([]byte("/certs\x00\xff\xfe")) + "\n", []string{"holds control"}},
		{"cert_dir not a string", "- cert_dir: [/a, /b]\n", []string{"not a YAML list of deliveries"}},
		// Each file name.
		{"svid_file_name traversal", "- cert_dir: /certs\n  svid_file_name: ../../../etc/passwd\n", []string{"svid_file_name", "must not contain '/'"}},
		{"svid_key_file_name traversal", "- cert_dir: /certs\n  svid_key_file_name: ../../" + hostDir + "/key\n", []string{"svid_key_file_name", "must not contain '/'"}},
		{"svid_bundle_file_name traversal", "- cert_dir: /certs\n  svid_bundle_file_name: ..\n", []string{"svid_bundle_file_name", "is reserved"}},
		{"svid_file_name absolute", "- cert_dir: /certs\n  svid_file_name: " + hostDir + "/etc/passwd\n", []string{"svid_file_name", "must not contain '/'"}},
		{"svid_key_file_name absolute", "- cert_dir: /certs\n  svid_key_file_name: /etc/shadow\n", []string{"svid_key_file_name", "must not contain '/'"}},
		{"svid_bundle_file_name absolute", "- cert_dir: /certs\n  svid_bundle_file_name: /bundle.pem\n", []string{"svid_bundle_file_name", "must not contain '/'"}},
		{"svid_file_name ..data", "- cert_dir: /certs\n  svid_file_name: ..data\n", []string{"svid_file_name", "is reserved"}},
		{"svid_key_file_name dot", "- cert_dir: /certs\n  svid_key_file_name: .\n", []string{"svid_key_file_name", "is reserved"}},
		{"svid_file_name binary", "- cert_dir: /certs\n  svid_file_name: !!binary " + base64.StdEncoding.EncodeToString([]byte("a\x00b")) + "\n", []string{"svid_file_name", "holds control"}},
		{"file names collide", "- cert_dir: /certs\n  svid_file_name: x\n  svid_bundle_file_name: x\n", []string{"must differ"}},
		{"credential_bundle_file_name traversal", "- cert_dir: /certs\n  credential_bundle_file_name: ../../" + hostDir + "/creds\n", []string{"credential_bundle_file_name", "must not contain '/'"}},
		{"credential_bundle_file_name absolute", "- cert_dir: /certs\n  credential_bundle_file_name: /etc/shadow\n", []string{"credential_bundle_file_name", "must not contain '/'"}},
		{"credential_bundle_file_name ..data", "- cert_dir: /certs\n  credential_bundle_file_name: ..data\n", []string{"credential_bundle_file_name", "is reserved"}},
		{"credential_bundle_file_name over the key", "- cert_dir: /certs\n  credential_bundle_file_name: svid_key.pem\n", []string{"credential_bundle_file_name", "must differ"}},
		{"credential_bundle_file_name binary", "- cert_dir: /certs\n  credential_bundle_file_name: !!binary " + base64.StdEncoding.EncodeToString([]byte("c\x00\xff")) + "\n", []string{"credential_bundle_file_name", "holds control"}},
		{"include_federated_domains not a bool", "- cert_dir: /certs\n  include_federated_domains: " + hostDir + "\n", []string{"into bool"}},
		{"include_federated_domains list", "- cert_dir: /certs\n  include_federated_domains: [true, true]\n", []string{"into bool"}},
		{"include_federated_domains quoted", "- cert_dir: /certs\n  include_federated_domains: \"true\"\n", []string{"into bool"}},
		{"file name posing as a trust bundle", "- cert_dir: /certs\n  svid_bundle_file_name: evil.test.trust-bundle.pem\n", []string{"svid_bundle_file_name", "is reserved"}},
		{"layout unknown", "- cert_dir: /certs\n  layout: " + hostDir + "\n", []string{"layout", "is not known"}},
		{"layout binary", "- cert_dir: /certs\n  layout: !!binary " + base64.StdEncoding.EncodeToString([]byte("spiffe-fs\x00")) + "\n", []string{"layout \"(unprintable or too long)\" is not known"}},
		{"layout spiffe-fs with a file name", "- cert_dir: /certs\n  layout: spiffe-fs\n  svid_key_file_name: ../../" + hostDir + "/key\n", []string{"svid_key_file_name cannot be used with layout spiffe-fs"}},
		{"layout spiffe-fs merged", "- cert_dir: /certs\n  layout: spiffe-fs\n  include_federated_domains: true\n", []string{"include_federated_domains cannot be used with layout spiffe-fs"}},
		{"layout spiffe-fs traversal cert_dir", "- cert_dir: /certs/../..\n  layout: spiffe-fs\n", []string{"must not contain '..'"}},
		{"layout spiffe-fs another identity", "- cert_dir: /certs\n  layout: spiffe-fs\n  spiffe_id: " + workloadID + "\n", []string{"is not among the identities the agent returned"}},
		{"credential_bundle_file_name list", "- cert_dir: /certs\n  credential_bundle_file_name: [a, b]\n", []string{"not a YAML list of deliveries"}},
		// spiffe_id: never a path, and never an identity the agent did not return.
		{"spiffe_id traversal", "- cert_dir: /certs\n  spiffe_id: spiffe://example.org/../../etc/passwd\n", []string{"spiffe_id", "is not a SPIFFE ID"}},
		{"spiffe_id relative path", "- cert_dir: /certs\n  spiffe_id: ../../etc/passwd\n", []string{"spiffe_id", "is not a SPIFFE ID"}},
		{"spiffe_id host path", "- cert_dir: /certs\n  spiffe_id: " + hostDir + "\n", []string{"spiffe_id", "is not a SPIFFE ID"}},
		{"spiffe_id of another workload", "- cert_dir: /certs\n  spiffe_id: " + workloadID + "\n", []string{"spiffe_id " + workloadID + " is not among the identities the agent returned", hostileID}},
		{"spiffe_id binary", "- cert_dir: /certs\n  spiffe_id: !!binary " + base64.StdEncoding.EncodeToString([]byte("spiffe://example.org/\x1b[2J")) + "\n", []string{"spiffe_id"}},
		// spire_agent_address: only the node's sockets, compared as written.
		{"agent address relative", "- cert_dir: /certs\n  spire_agent_address: ../../tmp/evil.sock\n", []string{"spire_agent_address", "must be an absolute socket path"}},
		{"agent address traversal to the node's socket", "- cert_dir: /certs\n  spire_agent_address: " + filepath.Dir(e.spire.AdminSocket) + "/../admin/admin.sock\n", []string{"spire_agent_address", "is not allowed"}},
		{"agent address host path", "- cert_dir: /certs\n  spire_agent_address: " + hostDir + "/etc/passwd\n", []string{"spire_agent_address", "is not allowed"}},
		{"agent address control", "- cert_dir: /certs\n  spire_agent_address: \"" + e.spire.AdminSocket + "\\n\"\n", []string{"must be plain text"}},
		// JWT-SVIDs: file names like the others, audiences bounded, and
		// never a token of an identity the agent did not return.
		{"jwt_svid_file_name traversal", "- cert_dir: /certs\n  jwt_svids:\n  - {jwt_audience: a, jwt_svid_file_name: ../../" + hostDir + "/tok}\n", []string{"jwt_svid_file_name", "must not contain '/'"}},
		{"jwt_svid_file_name absolute", "- cert_dir: /certs\n  jwt_svids:\n  - {jwt_audience: a, jwt_svid_file_name: /etc/shadow}\n", []string{"jwt_svid_file_name", "must not contain '/'"}},
		{"jwt_svid_file_name ..data", "- cert_dir: /certs\n  jwt_svids:\n  - {jwt_audience: a, jwt_svid_file_name: ..data}\n", []string{"jwt_svid_file_name", "is reserved"}},
		{"jwt_svid_file_name over the key", "- cert_dir: /certs\n  jwt_svids:\n  - {jwt_audience: a, jwt_svid_file_name: svid_key.pem}\n", []string{"jwt_svid_file_name", "already the name of another file"}},
		{"jwt_bundle_file_name traversal", "- cert_dir: /certs\n  jwt_bundle_file_name: ../../" + hostDir + "/b.json\n", []string{"jwt_bundle_file_name", "must not contain '/'"}},
		{"jwt_audience newline", "- cert_dir: /certs\n  jwt_svids:\n  - {jwt_audience: \"a\\nb\", jwt_svid_file_name: t}\n", []string{"audience", "holds '\\n'"}},
		{"jwt_audience quote and space", "- cert_dir: /certs\n  jwt_svids:\n  - {jwt_audience: 'a\" b', jwt_svid_file_name: t}\n", []string{"audience", "holds '\"'"}},
		{"jwt_audience binary", "- cert_dir: /certs\n  jwt_svids:\n  - {jwt_audience: !!binary " + base64.StdEncoding.EncodeToString([]byte("a\x00\xff")) + ", jwt_svid_file_name: t}\n", []string{"audience", "holds"}},
		{"jwt_audience over 256", "- cert_dir: /certs\n  jwt_svids:\n  - {jwt_audience: " + long(300) + ", jwt_svid_file_name: t}\n", []string{"longer than 256 bytes"}},
		{"nine audiences", "- cert_dir: /certs\n  jwt_svids:\n  - {jwt_audience: a, jwt_extra_audiences: [b, c, d, e, f, g, h, i], jwt_svid_file_name: t}\n", []string{"9 audiences, more than the 8 allowed"}},
		{"nine JWT-SVIDs", "- cert_dir: /certs\n  jwt_svids:\n" + strings.Repeat("  - {jwt_audience: a, jwt_svid_file_name: t}\n", 9), []string{"9 JWT-SVIDs, more than the 8 allowed"}},
		{"JWT-SVID of another workload", "- cert_dir: /certs\n  spiffe_id: " + workloadID + "\n  jwt_svids:\n  - {jwt_audience: a, jwt_svid_file_name: t}\n", []string{"spiffe_id " + workloadID + " is not among the identities the agent returned"}},
		// renew_signal: only the four reload signals.
		{"renew_signal SIGKILL", "- cert_dir: /certs\n  renew_signal: SIGKILL\n", []string{"renew_signal \"SIGKILL\" is not allowed"}},
		{"renew_signal SIGTERM", "- cert_dir: /certs\n  renew_signal: SIGTERM\n", []string{"renew_signal \"SIGTERM\" is not allowed"}},
		{"renew_signal number", "- cert_dir: /certs\n  renew_signal: 9\n", []string{"renew_signal \"9\" is not allowed"}},
		{"renew_signal control", "- cert_dir: /certs\n  renew_signal: \"SIGHUP\\n\"\n", []string{"renew_signal must be one of"}},
		// Size.
		{"value over 64 KiB", "- cert_dir: /" + long(70000) + "\n", []string{"more than the 65536 allowed"}},
		{"cert_dir over 1 KiB", "- cert_dir: /" + long(2000) + "\n", []string{"cert_dir is longer than 1024 bytes"}},
		{"file name over 255", "- cert_dir: /certs\n  svid_key_file_name: " + long(300) + "\n", []string{"svid_key_file_name", "longer than 255 bytes"}},
		{"10,000 entries (aliases)", aliased, []string{"10000 deliveries, more than the 16 allowed"}},
		{"10,000 entries (plain)", plain.String(), []string{"more than the 65536 allowed"}},
		{"17 entries", seventeen.String(), []string{"17 deliveries, more than the 16 allowed"}},
		{"deeply nested lists", deep, []string{"not a YAML list of deliveries"}},
		{"deeply nested maps", deepMap, []string{"not a YAML list of deliveries"}},
		// Billion laughs.
		{"billion laughs as the value", bomb(""), []string{"not a YAML list of deliveries"}},
		{"billion laughs as list items", bombList, []string{"not a YAML list of deliveries"}},
		{"billion laughs in a field", bombField, []string{"not a YAML list of deliveries"}},
		// Unknown keys and other shapes.
		{"unknown key", "- cert_dir: /certs\n  host_path: " + hostDir + "\n", []string{"field host_path not found"}},
		{"misspelt key", "- cert_dri: /certs\n", []string{"field cert_dri not found"}},
		{"duplicate key", "- cert_dir: /certs\n  cert_dir: " + hostDir + "\n", []string{"already defined"}},
		{"mapping, not a list", "cert_dir: /certs\n", []string{"not a YAML list of deliveries"}},
		{"two documents", "- cert_dir: /certs\n---\n- cert_dir: /etc\n", []string{"more than one YAML document"}},
		{"null item", "- cert_dir: /certs\n- ~\n", []string{"delivery 1 is empty"}},
		{"empty", "", []string{"value is empty"}},
		{"NUL byte", "- cert_dir: /certs\x00\n", []string{"not valid UTF-8 text"}},
		{"raw control character", "- cert_dir: /certs\x1b\n", []string{"not a YAML list of deliveries"}},
		{"python tag", "- !!python/object/apply:os.system [\"touch " + hostDir + "/pwned\"]\n", []string{"not a YAML list of deliveries"}},
		{"nested cert_dirs", "- cert_dir: /certs\n- cert_dir: /certs/inner\n", []string{"lies inside cert_dir"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pid := startOriginal(t).Process.Pid
			b := newBundle(t, []string{"/bin/true"})
			rootfs, host := snapshot(t, b.rootfs), snapshot(t, hostDir)
			start := time.Now()
			code, stderr, ps := e.runHookState(t, b, e.config, pid, c.ann)
			took := time.Since(start)
			// What a hostile value costs the hook is its CPU time and
			// memory, which a busy machine does not inflate as it does
			// wall-clock time.
			cpu := ps.UserTime() + ps.SystemTime()
			rss := ps.SysUsage().(*syscall.Rusage).Maxrss << 10
			t.Logf("%s (CPU %s, max RSS %d MiB): %.300s", took.Round(time.Millisecond), cpu.Round(time.Millisecond), rss>>20, strings.TrimSpace(stderr))
			if code != 1 {
				t.Errorf("exit code %d, want 1 (stderr %.300q)", code, stderr)
			}
			if lines := strings.Split(strings.TrimSpace(stderr), "\n"); len(lines) != 1 {
				t.Errorf("want one line, got %d: %.500q", len(lines), stderr)
			}
			for _, w := range append([]string{"container " + b.id + ":", "annotation " + annotation + ":"}, c.want...) {
				if !strings.Contains(stderr, w) {
					t.Errorf("message lacks %q: %.500q", w, stderr)
				}
			}
			if len(stderr) > 4096 {
				t.Errorf("message is %d bytes long: %.300q...", len(stderr), stderr)
			}
			if cpu > 2*time.Second {
				t.Errorf("the hook used %s of CPU", cpu)
			}
			if rss > 256<<20 {
				t.Errorf("the hook's memory peaked at %d MiB", rss>>20)
			}
			if got := e.listState(); !clean(got) {
				t.Errorf("state directory holds %v", got)
			}
			if d := diffSnapshots(rootfs, snapshot(t, b.rootfs)); len(d) > 0 {
				t.Errorf("rootfs changed: %v", d)
			}
			if d := diffSnapshots(host, snapshot(t, hostDir)); len(d) > 0 {
				t.Errorf("host directory changed: %v", d)
			}
			if m := testhelp.MountsUnder(t, b.dir, filepath.Dir(hostDir)); len(m) > 0 {
				t.Errorf("mounted on the host: %v", m)
			}
		})
	}
}

// TestHostileImages: the image (the rootfs) plants symlinks, loops and
// files where cert_dir goes. The identity mount lands inside the rootfs,
// where the container reads it through its own links, or the hook refuses
// with a line naming the annotation and cert_dir; nothing is created or
// mounted on the host, and a refused container leaves no state behind.
func TestHostileImages(t *testing.T) {
	e := hostileEnv(t)
	type image struct {
		rootfs, host string // host: a directory on the host the image names
	}
	cases := []struct {
		name    string
		certDir string
		plant   func(t *testing.T, im image)
		// readAt, when set, is where the container finds its SVID (it
		// starts); otherwise the hook must refuse with every refuse string.
		readAt string
		refuse []string
		// landsAt is where, inside the rootfs, the mount point must be.
		landsAt string
	}{
		{
			name: "cert_dir is a symlink to an absolute host directory", certDir: "/certs",
			plant:  func(t *testing.T, im image) { symlink(t, im.host, im.rootfs, "certs") },
			refuse: []string{"cert_dir /certs", "creating /certs inside the rootfs"},
		},
		{
			name: "cert_dir is a symlink to an absolute path that exists in the image too", certDir: "/certs",
			plant: func(t *testing.T, im image) {
				os.MkdirAll(filepath.Join(im.rootfs, im.host), 0o755)
				symlink(t, im.host, im.rootfs, "certs")
			},
			readAt: "/certs", landsAt: "HOST",
		},
		{
			name: "cert_dir is a symlink to ../../..", certDir: "/certs",
			plant:  func(t *testing.T, im image) { symlink(t, "../../..", im.rootfs, "certs") },
			refuse: []string{"cert_dir /certs"},
		},
		{
			name: "cert_dir is a symlink to /", certDir: "/certs",
			plant:  func(t *testing.T, im image) { symlink(t, "/", im.rootfs, "certs") },
			refuse: []string{"cert_dir /certs"},
		},
		{
			name: "cert_dir is a symlink to ../../../<host dir>", certDir: "/certs",
			plant:  func(t *testing.T, im image) { symlink(t, "../../../../../.."+im.host, im.rootfs, "certs") },
			refuse: []string{"cert_dir /certs", "creating /certs inside the rootfs"},
		},
		{
			name: "symlinked parent chain that climbs out", certDir: "/a/certs",
			plant: func(t *testing.T, im image) {
				symlink(t, "b", im.rootfs, "a")
				symlink(t, "/c/d", im.rootfs, "b")
				os.MkdirAll(filepath.Join(im.rootfs, "c"), 0o755)
				symlink(t, "../../../../../../e", im.rootfs, "c/d")
				os.MkdirAll(filepath.Join(im.rootfs, "e"), 0o755)
			},
			readAt: "/a/certs", landsAt: "/e/certs",
		},
		{
			name: "symlinked parent chain that ends on the host", certDir: "/a/certs",
			plant: func(t *testing.T, im image) {
				symlink(t, "b", im.rootfs, "a")
				symlink(t, im.host, im.rootfs, "b")
			},
			refuse: []string{"cert_dir /a/certs", "creating /a/certs inside the rootfs"},
		},
		{
			name: "symlink loop", certDir: "/l1/certs",
			plant: func(t *testing.T, im image) {
				symlink(t, "/l2", im.rootfs, "l1")
				symlink(t, "/l1", im.rootfs, "l2")
			},
			refuse: []string{"cert_dir /l1/certs", "creating /l1/certs inside the rootfs"},
		},
		{
			name: "cert_dir is a regular file", certDir: "/certs",
			plant: func(t *testing.T, im image) {
				os.WriteFile(filepath.Join(im.rootfs, "certs"), []byte("image file\n"), 0o644)
			},
			refuse: []string{"cert_dir /certs", "creating /certs inside the rootfs"},
		},
		{
			name: "a parent of cert_dir is a regular file", certDir: "/etc/passwd/certs",
			plant:  func(t *testing.T, im image) {},
			refuse: []string{"cert_dir /etc/passwd/certs", "creating /etc/passwd/certs inside the rootfs"},
		},
		{
			name: "cert_dir is a symlink to a file", certDir: "/certs",
			plant:  func(t *testing.T, im image) { symlink(t, "/etc/passwd", im.rootfs, "certs") },
			refuse: []string{"cert_dir /certs", "creating /certs inside the rootfs"},
		},
		{
			name: "cert_dir is a dangling symlink", certDir: "/certs",
			plant:  func(t *testing.T, im image) { symlink(t, "/nowhere/at/all", im.rootfs, "certs") },
			refuse: []string{"cert_dir /certs", "creating /certs inside the rootfs"},
		},
		{
			name: "cert_dir through /proc/1/root", certDir: "/proc/1/root/pwned",
			plant:  func(t *testing.T, im image) {},
			refuse: []string{"cert_dir", "/proc/1/root/pwned", "kernel filesystem"},
		},
		{
			name: "cert_dir through /proc/self/cwd", certDir: "/proc/self/cwd/pwned",
			plant:  func(t *testing.T, im image) {},
			refuse: []string{"cert_dir", "/proc/self/cwd/pwned", "kernel filesystem"},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			hostParent := shortTempDir(t)
			host := filepath.Join(hostParent, "host")
			os.MkdirAll(host, 0o755)
			os.WriteFile(filepath.Join(host, "keep"), []byte("host\n"), 0o644)
			script := "echo STARTED"
			if c.readAt != "" {
				script = "cat " + c.readAt + "/svid.pem >/dev/null && echo STARTED"
			}
			b := newBundle(t, []string{"/bin/sh", "-c", script})
			im := image{rootfs: b.rootfs, host: host}
			c.plant(t, im)
			b.AddAnnotation(annotation, "- cert_dir: "+c.certDir+"\n")
			b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
			rootfsBefore, hostBefore := snapshot(t, b.rootfs), snapshot(t, hostParent)
			escapes := []string{"/pwned", filepath.Join(b.dir, "pwned"), filepath.Join(repoRoot, "test", "e2e", "pwned")}
			for _, p := range escapes {
				if _, err := os.Lstat(p); err == nil {
					t.Fatalf("%s exists before the test", p)
				}
			}

			out, stderr, err := b.runc(t)
			if c.readAt != "" {
				if err != nil || strings.TrimSpace(out) != "STARTED" {
					t.Fatalf("the container did not read its SVID at %s: %v: out %q stderr %s", c.readAt, err, out, stderr)
				}
				landsAt := c.landsAt
				if landsAt == "HOST" {
					landsAt = host
				}
				if st, err := os.Stat(filepath.Join(b.rootfs, landsAt)); err != nil || !st.IsDir() {
					t.Errorf("the mount point %s is not inside the rootfs: %v", landsAt, err)
				}
			} else {
				refusedCleanly(t, e, b, rootfsBefore, out, stderr, err, append([]string{"annotation " + annotation}, c.refuse...)...)
			}
			if d := diffSnapshots(hostBefore, snapshot(t, hostParent)); len(d) > 0 {
				t.Errorf("host directory changed: %v", d)
			}
			for _, p := range escapes {
				if _, err := os.Lstat(p); err == nil {
					os.Remove(p)
					t.Errorf("the hook created %s on the host", p)
				}
			}
			if m := testhelp.MountsUnder(t, b.dir, hostParent); len(m) > 0 {
				t.Errorf("mounted on the host: %v", m)
			}
			t.Logf("stderr: %s", strings.TrimSpace(stderr))
		})
	}
}

func symlink(t *testing.T, target, rootfs, name string) {
	t.Helper()
	p := filepath.Join(rootfs, name)
	os.MkdirAll(filepath.Dir(p), 0o755)
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

// refusedCleanly checks a container the hook refused: runc failed and the
// command never ran, runc's error carries the hook's words, the rootfs is
// as it was (rootfsBefore), and the state directory holds nothing of it.
func refusedCleanly(t *testing.T, e *env, b *bundle, rootfsBefore map[string]string, out, stderr string, err error, words ...string) {
	t.Helper()
	if err == nil || strings.Contains(out, "STARTED") {
		t.Fatalf("the container started: out %q stderr %s", out, stderr)
	}
	for _, w := range words {
		if !strings.Contains(stderr, w) {
			t.Errorf("runc's error lacks %q: %s", w, stderr)
		}
	}
	if d := diffSnapshots(rootfsBefore, snapshot(t, b.rootfs)); len(d) > 0 {
		t.Errorf("rootfs changed by a refused delivery: %v", d)
	}
	for _, p := range e.listState() {
		if strings.Contains(p, b.id) {
			t.Errorf("state directory holds %s of the refused container", p)
			break
		}
	}
}
