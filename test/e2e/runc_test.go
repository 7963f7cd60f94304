package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
)

// emptyState is the state directory's layout with no container in it.
var emptyState = []string{"", "/containers", "/locks", "/records"}

// TestRuncDeliversSVID: the container's own process reads a valid SVID for
// the workload's entry from cert_dir, through a read-only mount, with the
// key readable by the container user only; poststop removes everything.
func TestRuncDeliversSVID(t *testing.T) {
	e := newEnv(t)
	for _, readonly := range []bool{false, true} {
		t.Run(fmt.Sprintf("readonly-rootfs=%v", readonly), func(t *testing.T) {
			const certDir = "/var/run/secrets/spiffe"
			b, out := e.runPrinting(t, certDir, func(b *bundle) { b.SetRootReadonly(readonly) })
			mnt := section(t, out, "mount")
			opts := strings.Fields(mnt)[5]
			for _, o := range []string{"ro", "nosuid", "nodev", "noexec"} {
				if !slices.Contains(strings.Split(opts, ","), o) {
					t.Errorf("mount options %q lack %s (mountinfo: %s)", opts, o, mnt)
				}
			}
			if strings.Contains(out, "WRITABLE") {
				t.Error("the container could write into cert_dir")
			}

			// Outside: the key on the host is 0600 and owned by the
			// container's uid; the record names the delivered identity.
			key := filepath.Join(e.stateDir, "containers", b.id, "0", "svid_key.pem")
			st, err := os.Stat(key)
			if err != nil {
				t.Fatal(err)
			}
			sys := st.Sys().(*syscall.Stat_t)
			if st.Mode().Perm() != 0o600 || sys.Uid != 1000 || sys.Gid != 1000 {
				t.Errorf("host key %s: mode %o owner %d:%d, want 600 1000:1000", key, st.Mode().Perm(), sys.Uid, sys.Gid)
			}
			rec := e.readRecord(b.id)
			ds := rec["deliveries"].([]any)
			if got := ds[0].(map[string]any)["delivered_spiffe_id"]; got != workloadID {
				t.Errorf("record delivered %v, want %s", got, workloadID)
			}

			// poststop forgets the container.
			state, _ := json.Marshal(rspec.State{Version: rspec.Version, ID: b.id, Status: rspec.StateStopped, Bundle: b.dir})
			cmd := exec.Command(hookBin, "--config", e.config)
			cmd.Stdin = strings.NewReader(string(state))
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("poststop: %v: %s", err, out)
			}
			if got := e.listState(); !slices.Equal(got, emptyState) {
				t.Errorf("after poststop the state directory holds %v", got)
			}
		})
	}
}

// TestRuncPoststopHook: with the hook also at poststop (as hooks.d
// installs it), nothing is left once the container is gone.
func TestRuncPoststopHook(t *testing.T) {
	e := newEnv(t)
	b := newBundle(t, []string{"/bin/cat", "/certs/svid.pem"})
	b.AddAnnotation(annotation, "- cert_dir: /certs\n")
	h := e.hook(e.config)
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{h}, Poststop: []rspec.Hook{h}}
	out, stderr, err := b.runc(t)
	if err != nil {
		t.Fatalf("runc run: %v\nstderr: %s", err, stderr)
	}
	if !strings.Contains(out, "BEGIN CERTIFICATE") {
		t.Fatalf("container did not print its certificate: %q", out)
	}
	if got := e.listState(); !slices.Equal(got, emptyState) {
		t.Errorf("after the container stopped the state directory holds %v", got)
	}
}

// TestRuncHookTwice: the hook registered twice for one container (CRI-O's
// prestart and createRuntime, or NRI plus hook-injector) mounts once.
func TestRuncHookTwice(t *testing.T) {
	e := newEnv(t)
	b := newBundle(t, []string{"/bin/sh", "-c", "grep -c ' /certs ' /proc/self/mountinfo"})
	b.AddAnnotation(annotation, "- cert_dir: /certs\n")
	h := e.hook(e.config)
	b.Config.Hooks = &rspec.Hooks{Prestart: []rspec.Hook{h}, CreateRuntime: []rspec.Hook{h}}
	out, stderr, err := b.runc(t)
	if err != nil {
		t.Fatalf("runc run: %v\nstderr: %s", err, stderr)
	}
	if strings.TrimSpace(out) != "1" {
		t.Errorf("/certs is mounted %s times, want once", strings.TrimSpace(out))
	}
}

// TestRuncNoAnnotation: a container that did not ask gets nothing, and the
// hook touches nothing.
func TestRuncNoAnnotation(t *testing.T) {
	requireRoot(t)
	dir := shortTempDir(t)
	stateDir := filepath.Join(dir, "state")
	b := newBundle(t, []string{"/bin/sh", "-c", "test ! -e /certs && echo NOTHING"})
	// The agent socket does not exist and the named node configuration is
	// missing (an error if it were read): the hook must look at neither.
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{{Path: hookBin, Args: []string{"spiffe-oci-hook",
		"--config", filepath.Join(dir, "missing.yaml"), "--agent-admin-socket", filepath.Join(dir, "none.sock"), "--state-dir", stateDir}}}}
	out, stderr, err := b.runc(t)
	if err != nil {
		t.Fatalf("runc run: %v\nstderr: %s", err, stderr)
	}
	if strings.TrimSpace(out) != "NOTHING" {
		t.Errorf("container output %q", out)
	}
	if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
		t.Errorf("the hook created its state directory for a container that did not ask (%v)", err)
	}
}

// TestRuncDroppedPodAnnotation: under containerd, NRI's hook-injector
// injects the hook when the pod's annotations match, but config.json holds
// them only if containerd's pod_annotations allows them. runc runs such a
// container here: containerd's CRI annotations, no identity annotation.
// The container must not start without its identity, and runc's error
// carries the hook's line naming the fix; with fail-open it starts, and
// the hook says why.
func TestRuncDroppedPodAnnotation(t *testing.T) {
	requireRoot(t)
	dir := shortTempDir(t)
	stateDir := filepath.Join(dir, "state")
	cri := func(b *bundle) {
		b.AddAnnotation("io.kubernetes.cri.container-type", "container")
		b.AddAnnotation("io.kubernetes.cri.container-name", "app")
		b.AddAnnotation("io.kubernetes.cri.sandbox-id", "5d0c6f0e6a1b")
	}
	hook := func(policy string) []rspec.Hook {
		return []rspec.Hook{{Path: hookBin, Args: []string{"spiffe-oci-hook", "--agent-admin-socket", filepath.Join(dir, "none.sock"),
			"--state-dir", stateDir, "--failure-policy", policy}}}
	}

	b := newBundle(t, []string{"/bin/echo", "STARTED"})
	cri(b)
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: hook("fail-closed")}
	out, stderr, err := b.runc(t)
	if err == nil || strings.Contains(out, "STARTED") {
		t.Fatalf("the container started without its identity: out %q", out)
	}
	if !strings.Contains(stderr, "pod_annotations") || !strings.Contains(stderr, "spiffe-oci-nri") || !strings.Contains(stderr, b.id) {
		t.Errorf("runc's error does not carry the hook's line: %s", stderr)
	}

	b = newBundle(t, []string{"/bin/sh", "-c", "test -e /certs || echo NO-IDENTITY"})
	cri(b)
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: hook("fail-open")}
	if out, stderr, err := b.runc(t); err != nil || strings.TrimSpace(out) != "NO-IDENTITY" {
		t.Errorf("fail-open: %v, output %q: %s", err, out, stderr)
	}
	if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
		t.Errorf("the hook created its state directory (%v)", err)
	}
}

// TestRuncSymlinkEscape: a parent of cert_dir in the image is a symlink to
// an absolute path. Before pivot_root that path would name the host's;
// nothing may be created or mounted there. Where the target exists inside
// the rootfs (an image whose /var/run links to /etc) the delivery lands
// there and the container reads it through its own symlink; where it does
// not, the hook refuses.
func TestRuncSymlinkEscape(t *testing.T) {
	e := newEnv(t)

	t.Run("target inside the rootfs", func(t *testing.T) {
		// A name of this run's own: whether the hook created it on the
		// host can be told on every host (one that has /etc/spiffe too).
		name := "spiffe-escape-" + newUID()[:8]
		hostPath := filepath.Join("/etc", name)
		if _, err := os.Lstat(hostPath); err == nil {
			t.Fatalf("%s exists before the test", hostPath)
		}
		b := newBundle(t, []string{"/bin/sh", "-c", "cat /var/run/" + name + "/svid.pem >/dev/null && echo READ"})
		os.MkdirAll(filepath.Join(b.rootfs, "var"), 0o755)
		if err := os.Symlink("/etc", filepath.Join(b.rootfs, "var", "run")); err != nil {
			t.Fatal(err)
		}
		b.AddAnnotation(annotation, "- cert_dir: /var/run/"+name+"\n")
		b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
		out, stderr, err := b.runc(t)
		if err != nil {
			t.Fatalf("runc run: %v\nstderr: %s", err, stderr)
		}
		if strings.TrimSpace(out) != "READ" {
			t.Errorf("container could not read its SVID through its own symlink: %q", out)
		}
		if _, err := os.Lstat(hostPath); err == nil {
			os.RemoveAll(hostPath)
			t.Fatalf("the hook created %s on the host", hostPath)
		}
		if _, err := os.Stat(filepath.Join(b.rootfs, "etc", name)); err != nil {
			t.Errorf("the delivery did not land inside the rootfs: %v", err)
		}
	})

	t.Run("target only on the host", func(t *testing.T) {
		host := filepath.Join(shortTempDir(t), "host-only")
		if err := os.MkdirAll(host, 0o755); err != nil {
			t.Fatal(err)
		}
		b := newBundle(t, []string{"/bin/echo", "STARTED"})
		os.MkdirAll(filepath.Join(b.rootfs, "var"), 0o755)
		if err := os.Symlink(host, filepath.Join(b.rootfs, "var", "run")); err != nil {
			t.Fatal(err)
		}
		b.AddAnnotation(annotation, "- cert_dir: /var/run/spiffe\n")
		b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
		out, stderr, err := b.runc(t)
		if err == nil || strings.Contains(out, "STARTED") {
			t.Fatalf("the container started: %q", out)
		}
		if !strings.Contains(stderr, "creating /var/run/spiffe inside the rootfs") {
			t.Errorf("runc's error does not carry the hook's reason: %s", stderr)
		}
		if entries, _ := os.ReadDir(host); len(entries) != 0 {
			t.Errorf("the hook created %v at the host path %s", entries, host)
		}
		if mounts, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(mounts), host) {
			t.Errorf("something is mounted at the host path %s", host)
		}
		for _, p := range e.listState() {
			if strings.Contains(p, b.id) {
				t.Errorf("state directory holds %s of the refused container", p)
			}
		}
	})
}

// runHook runs the hook binary directly for a container whose process is
// pid, with annotation value ann; it returns the exit code and stderr.
func (e *env) runHook(t *testing.T, b *bundle, config string, pid int, ann string) (int, string) {
	t.Helper()
	code, stderr, _ := e.runHookState(t, b, config, pid, ann)
	return code, stderr
}

// runHookState is runHook that also returns the hook's process state, for
// its resource usage.
func (e *env) runHookState(t *testing.T, b *bundle, config string, pid int, ann string) (int, string, *os.ProcessState) {
	t.Helper()
	b.save(t)
	state, _ := json.Marshal(rspec.State{
		Version: rspec.Version, ID: b.id, Status: rspec.StateCreating, Pid: pid, Bundle: b.dir,
		Annotations: map[string]string{annotation: ann},
	})
	return runBinaryState(t, hookBin, string(state), "--config", config)
}

func runBinary(t *testing.T, bin, stdin string, args ...string) (int, string) {
	t.Helper()
	code, stderr, _ := runBinaryState(t, bin, stdin, args...)
	return code, stderr
}

func runBinaryState(t *testing.T, bin, stdin string, args ...string) (int, string, *os.ProcessState) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), stderr.String(), cmd.ProcessState
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, stderr.String(), cmd.ProcessState
}

// startAs starts `sleep` as uid, standing in for a container's process.
func startAs(t *testing.T, uid uint32) int {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd.Process.Pid
}

// TestHookFailures: each failure exits 1 with one line that names the
// container and what to do, and leaves nothing behind.
func TestHookFailures(t *testing.T) {
	e := newEnv(t)
	// spiffe-oci-hook-direct where no entry names it: what speaks to the
	// agent is not an authorized delegate.
	unregistered := filepath.Join(shortTempDir(t), "spiffe-oci-hook-direct")
	data, err := os.ReadFile(hookDirectBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(unregistered, data, 0o755); err != nil {
		t.Fatal(err)
	}
	rootPid := startAs(t, 0)
	nobodyPid := startAs(t, 65534)
	missing := e.writeConfig("")
	// registration_wait 2s: the hook waits that long for an agent that
	// may be restarting before it says the socket is missing.
	os.WriteFile(missing, []byte(fmt.Sprintf("agent_admin_socket: %s/missing.sock\nstate_dir: %s\nregistration_wait: 2s\n", e.dir, e.stateDir)), 0o600)

	cases := []struct {
		name   string
		bin    string
		config string
		pid    int
		ann    string
		want   []string
	}{
		{"agent socket absent", hookBin, missing, rootPid, "- cert_dir: /certs\n", []string{"missing.sock is missing", "admin_socket_path"}},
		{"no entry for the pid", hookBin, e.config, nobodyPid, "- cert_dir: /certs\n", []string{"no registration entry matches", fmt.Sprint(nobodyPid)}},
		{"not an authorized delegate", unregistered, e.config, rootPid, "- cert_dir: /certs\n", []string{"refused this caller", "authorized_delegates", "unix:path:" + unregistered}},
		{"malformed YAML", hookBin, e.config, rootPid, "- cert_dir: [/certs\n", []string{"annotation " + annotation, "not a YAML list"}},
		{"relative cert_dir", hookBin, e.config, rootPid, "- cert_dir: certs\n", []string{"cert_dir \"certs\" must be an absolute path"}},
		{"dot-dot cert_dir", hookBin, e.config, rootPid, "- cert_dir: /certs/../../etc\n", []string{"must not contain '..'"}},
		{"file name with a slash", hookBin, e.config, rootPid, "- cert_dir: /certs\n  svid_file_name: ../../etc/passwd\n", []string{"svid_file_name", "must not contain '/'"}},
		{"disallowed spire_agent_address", hookBin, e.config, rootPid, "- cert_dir: /certs\n  spire_agent_address: /tmp/evil.sock\n", []string{"spire_agent_address \"/tmp/evil.sock\" is not allowed"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := newBundle(t, []string{"/bin/true"})
			before := listTree(b.rootfs)
			b.save(t)
			state, _ := json.Marshal(rspec.State{
				Version: rspec.Version, ID: b.id, Status: rspec.StateCreating, Pid: c.pid, Bundle: b.dir,
				Annotations: map[string]string{annotation: c.ann},
			})
			code, stderr := runBinary(t, c.bin, string(state), "--config", c.config)
			if !strings.Contains(stderr, "container "+b.id+":") {
				t.Errorf("message does not name the container: %q", stderr)
			}
			e.checkHookRefused(t, b, before, code, stderr, c.want...)
		})
	}
}

// checkHookRefused checks a hook run that refused b's container: exit
// code 1, one line on stderr that holds each of words, nothing in the
// state directory, and b's rootfs as listed before the run
// (rootfsBefore).
func (e *env) checkHookRefused(t *testing.T, b *bundle, rootfsBefore []string, code int, stderr string, words ...string) {
	t.Helper()
	if code != 1 {
		t.Errorf("exit code %d, want 1 (stderr %q)", code, stderr)
	}
	if lines := strings.Split(strings.TrimSpace(stderr), "\n"); len(lines) != 1 {
		t.Errorf("want one line, got %d: %q", len(lines), stderr)
	}
	for _, w := range words {
		if !strings.Contains(stderr, w) {
			t.Errorf("message lacks %q: %q", w, stderr)
		}
	}
	if got := e.listState(); !clean(got) {
		t.Errorf("state directory holds %v", got)
	}
	if after := listTree(b.rootfs); !slices.Equal(rootfsBefore, after) {
		t.Errorf("rootfs changed: %v -> %v", rootfsBefore, after)
	}
}

// TestRuncFailClosed: under runc a failed delivery stops the container and
// the runtime shows the hook's line.
func TestRuncFailClosed(t *testing.T) {
	e := newEnv(t)
	b := newBundle(t, []string{"/bin/echo", "STARTED"})
	b.AddAnnotation(annotation, "- cert_dir: relative\n")
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	out, stderr, err := b.runc(t)
	if err == nil || strings.Contains(out, "STARTED") {
		t.Fatalf("the container started without its identity: out %q", out)
	}
	if !strings.Contains(stderr, "cert_dir \\\"relative\\\" must be an absolute path") && !strings.Contains(stderr, `cert_dir "relative" must be an absolute path`) {
		t.Errorf("runc's error does not carry the hook's line: %s", stderr)
	}
}

// TestFailOpen: with failure_policy fail-open the container starts without
// files and the hook says why.
func TestFailOpen(t *testing.T) {
	e := newEnv(t)
	config := filepath.Join(e.dir, "failopen.yaml")
	// registration_wait 2s: how long the hook waits for a restarting
	// agent is not what this tests.
	os.WriteFile(config, []byte(fmt.Sprintf("agent_admin_socket: %s/missing.sock\nstate_dir: %s\nfailure_policy: fail-open\nregistration_wait: 2s\n", e.dir, e.stateDir)), 0o600)

	b := newBundle(t, []string{"/bin/sh", "-c", "test -e /certs/svid.pem || echo NO-IDENTITY"})
	b.AddAnnotation(annotation, "- cert_dir: /certs\n")
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(config)}}
	out, stderr, err := b.runc(t)
	if err != nil {
		t.Fatalf("fail-open container did not start: %v: %s", err, stderr)
	}
	if strings.TrimSpace(out) != "NO-IDENTITY" {
		t.Errorf("container output %q", out)
	}
	// The runtime drops a successful hook's output; run it directly to see
	// the line it logs (also sent to syslog).
	code, msg := e.runHook(t, newBundle(t, []string{"/bin/true"}), config, startAs(t, 0), "- cert_dir: /certs\n")
	if code != 0 || !strings.Contains(msg, "missing.sock is missing") || !strings.Contains(msg, "WITHOUT an identity (failure_policy: fail-open)") {
		t.Errorf("fail-open: exit %d, message %q", code, msg)
	}
	// A value that does not parse is a failure to deliver like any other.
	code, msg = e.runHook(t, newBundle(t, []string{"/bin/true"}), config, startAs(t, 0), "- cert_dir: relative\n")
	if code != 0 || !strings.Contains(msg, `cert_dir "relative" must be an absolute path`) || !strings.Contains(msg, "failure_policy: fail-open") {
		t.Errorf("fail-open, malformed annotation: exit %d, message %q", code, msg)
	}
	// Nothing but the fail-open traces the refresher's audit reads, one
	// per container let start (poststop, not configured here, removes
	// them; so does the refresher's rescan once the process is gone).
	var traces int
	for _, p := range e.listState() {
		if strings.HasPrefix(p, "/fail-open/") {
			traces++
		} else if !clean([]string{p}) {
			t.Errorf("state directory holds %s", p)
		}
	}
	if traces != 3 {
		t.Errorf("%d fail-open traces, want one per start (3): %v", traces, e.listState())
	}
}

// clean reports whether paths hold no container's state. A refresher's
// sockets (refresher.sock, handoff.sock) and heartbeat (refresher.alive)
// may be there too.
func clean(paths []string) bool {
	for _, p := range paths {
		if !slices.Contains(emptyState, p) && p != "/refresher.sock" && p != "/handoff.sock" && p != "/refresher.alive" && p != "/fail-open" {
			return false
		}
	}
	return true
}

func listTree(root string) []string {
	var paths []string
	filepath.Walk(root, func(p string, _ os.FileInfo, _ error) error {
		paths = append(paths, strings.TrimPrefix(p, root))
		return nil
	})
	return paths
}

// TestHookBadInput: garbage on stdin, a missing bundle and a pid that is
// not alive each give one line and exit 1, never a panic; none of them
// needs the agent.
func TestHookBadInput(t *testing.T) {
	requireRoot(t)
	dir := shortTempDir(t)
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	b := newBundle(t, []string{"/bin/true"})
	b.save(t)
	state := func(bundle string, pid int) string {
		s, _ := json.Marshal(rspec.State{Version: rspec.Version, ID: "bad-input", Status: rspec.StateCreating, Pid: pid, Bundle: bundle,
			Annotations: map[string]string{annotation: "- cert_dir: /certs\n"}})
		return string(s)
	}
	args := []string{"--agent-admin-socket", filepath.Join(dir, "none.sock"), "--state-dir", filepath.Join(dir, "state")}
	cases := []struct{ name, stdin, want string }{
		{"garbage", "\x00\x01 not json", "OCI state on stdin is not valid JSON"},
		{"empty", "", "OCI state on stdin is not valid JSON"},
		{"missing bundle", state(filepath.Join(dir, "no-such-bundle"), os.Getpid()), "reading bundle config"},
		{"dead pid", state(b.dir, dead.Process.Pid), "process is gone"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, stderr := runBinary(t, hookBin, c.stdin, args...)
			if code != 1 || !strings.Contains(stderr, c.want) || strings.Count(strings.TrimSpace(stderr), "\n") != 0 || strings.Contains(stderr, "panic") {
				t.Errorf("exit %d, stderr %q; want 1 and one line with %q", code, stderr, c.want)
			}
		})
	}
}
