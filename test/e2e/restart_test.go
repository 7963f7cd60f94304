package e2e

// Container ID reuse: `podman restart` and `--restart=always` run a new
// process under the same container ID. The refresher must keep serving
// the new instance, whatever order it learns of the old one's exit and
// the new one's record in.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// podmanNode is a private Podman store whose containers get the hook
// through a rendered hooks directory, named the way a node names it: in
// containers.conf (hooks_dir), which every Podman process reads. The
// --hooks-dir flag would not do: Podman's restart policy restarts a
// container through `podman container cleanup`, which conmon runs without
// that flag, so the restarted container runs without the hook (as the
// audit then reports; see TestAuditPodman).
type podmanNode struct {
	e      *env
	global []string
	env    []string
	rootfs string
}

func (e *env) podmanNode(t *testing.T, hooksDir string) *podmanNode {
	t.Helper()
	store := podmanStore(t)
	rootfs := filepath.Join(shortTempDir(t), "rootfs")
	makeBusyboxRootfs(t, rootfs)
	conf := filepath.Join(shortTempDir(t), "containers.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("[engine]\nhooks_dir = [%q]\n", hooksDir)), 0o644); err != nil {
		t.Fatal(err)
	}
	return &podmanNode{e: e, rootfs: rootfs, env: append(os.Environ(), "CONTAINERS_CONF="+conf), global: []string{
		"--root", filepath.Join(store, "root"), "--runroot", filepath.Join(store, "runroot"),
		"--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
	}}
}

// run starts a detached container named name; args go before --rootfs.
func (p *podmanNode) run(t *testing.T, name, script string, args ...string) {
	t.Helper()
	full := append(append([]string{}, p.global...), "run", "-d", "--name", name, "--network", "none",
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
	full = append(append(full, args...), "--rootfs", p.rootfs, "/bin/sh", "-c", script)
	cmd := exec.Command("podman", full...)
	cmd.Env = p.env
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("podman run: %v\n%s", err, out)
	}
	t.Cleanup(func() { p.cmd("rm", "-f", "-t", "0", name) })
	ourContainer(p.id(t, name))
}

func (p *podmanNode) cmd(args ...string) (string, error) {
	cmd := exec.Command("podman", append(append([]string{}, p.global...), args...)...)
	cmd.Env = p.env
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// pid returns the container's pid, 0 while it is not running.
func (p *podmanNode) pid(t *testing.T, name string) int {
	t.Helper()
	out, err := p.cmd("inspect", "--format", "{{.State.Pid}}", name)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(out)
	return pid
}

// id returns the container's full ID.
func (p *podmanNode) id(t *testing.T, name string) string {
	t.Helper()
	out, err := p.cmd("inspect", "--format", "{{.Id}}", name)
	if err != nil {
		t.Fatalf("podman inspect: %v: %s", err, out)
	}
	return out
}

// serial reads the container's files as it sees them, through the
// generation ..data names, and returns its certificate's serial after
// checking the SVID: rotatingID, key matching, chaining to the bundle,
// valid now. "" while there are no files.
func (e *env) serial(t *testing.T, pid int) string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/root/certs", pid)
	gen, err := os.Readlink(filepath.Join(dir, "..data"))
	if err != nil {
		return ""
	}
	cert, err1 := os.ReadFile(filepath.Join(dir, gen, "svid.pem"))
	key, err2 := os.ReadFile(filepath.Join(dir, gen, "svid_key.pem"))
	if err1 != nil || err2 != nil {
		return "" // rotated away under us, or the process is gone
	}
	svid, err := x509svid.Parse(cert, key)
	if err != nil {
		t.Fatalf("pid %d reads a cert and key that do not match: %v", pid, err)
	}
	if svid.ID.String() != rotatingID {
		t.Fatalf("pid %d reads an SVID for %s", pid, svid.ID)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, e.spire.TrustBundle(t)); err != nil {
		t.Fatalf("pid %d reads an SVID that does not chain to the bundle: %v", pid, err)
	}
	if leaf := svid.Certificates[0]; time.Now().After(leaf.NotAfter) {
		t.Fatalf("pid %d reads an expired SVID (NotAfter %s)", pid, leaf.NotAfter)
	}
	return svid.Certificates[0].SerialNumber.String()
}

// servedAndRotating waits for the instance running as pid to have valid
// files, a record naming it, and then a rotation of its files.
func (e *env) servedAndRotating(t *testing.T, id string, pid int, ttl time.Duration) {
	t.Helper()
	var first string
	testhelp.Eventually(t, 10*time.Second, fmt.Sprintf("pid %d has valid files", pid), func() bool {
		first = e.serial(t, pid)
		return first != ""
	})
	testhelp.Eventually(t, 10*time.Second, "the record names the new instance", func() bool {
		var rec struct {
			PID int `json:"pid"`
		}
		data, err := os.ReadFile(filepath.Join(e.stateDir, "records", id+".json"))
		return err == nil && json.Unmarshal(data, &rec) == nil && rec.PID == pid
	})
	start := time.Now()
	testhelp.Eventually(t, ttl, fmt.Sprintf("pid %d's files rotate", pid), func() bool {
		s := e.serial(t, pid)
		return s != "" && s != first
	})
	t.Logf("pid %d: files valid, rotated after %s", pid, time.Since(start).Round(100*time.Millisecond))
}

// TestPodmanRestartKeepsIdentity: after `podman restart` and after a
// --restart=always restart, the container (same ID, new process) has
// valid files that keep rotating.
func TestPodmanRestartKeepsIdentity(t *testing.T) {
	// Short, so that each of the four rotations waited for comes in
	// about 10 s.
	const ttl = 20 * time.Second
	e := rotatingEnv(t, ttl)
	r := e.startRefresher(t)
	p := e.podmanNode(t, renderHooksDir(t, e.config))
	ann := []string{"--annotation", annotation + "=- cert_dir: /certs"}

	t.Run("podman restart", func(t *testing.T) {
		p.run(t, "restarted", "while :; do sleep 1; done", ann...)
		id := p.id(t, "restarted")
		pid := p.pid(t, "restarted")
		e.servedAndRotating(t, id, pid, ttl)
		for i := range 2 {
			if out, err := p.cmd("restart", "-t", "0", "restarted"); err != nil {
				t.Fatalf("podman restart: %v: %s", err, out)
			}
			next := p.pid(t, "restarted")
			if next == 0 || next == pid || p.id(t, "restarted") != id {
				t.Fatalf("restart %d: pid %d -> %d, ID %s: not a new instance under the same ID", i+1, pid, next, p.id(t, "restarted"))
			}
			pid = next
			e.servedAndRotating(t, id, pid, ttl)
		}
	})

	t.Run("restart=always", func(t *testing.T) {
		p.run(t, "always", "while :; do sleep 1; done", append([]string{"--restart=always"}, ann...)...)
		id := p.id(t, "always")
		pid := p.pid(t, "always")
		e.servedAndRotating(t, id, pid, ttl)
		for i := range 2 {
			// The container's init ignores signals from inside; the host's
			// SIGKILL ends it and Podman's restart policy starts it again.
			syscall.Kill(pid, syscall.SIGKILL)
			var next int
			testhelp.Eventually(t, 30*time.Second, "restarted by its policy", func() bool {
				next = p.pid(t, "always")
				return next != 0 && next != pid
			})
			if p.id(t, "always") != id {
				t.Fatalf("restart %d changed the container ID", i+1)
			}
			pid = next
			e.servedAndRotating(t, id, pid, ttl)
		}
	})
	if log := readFile(r.log); strings.Contains(log, "level=ERROR") {
		t.Errorf("the refresher logged errors:\n%s", log)
	}
}

// TestRenewSignalBehindInit: `podman run --init` makes catatonit the
// container's init, which forwards every signal to the application. A
// renew_signal of SIGHUP would reach a shell that has no handler for it
// and end the container at the first rotation. The refresher rotates the
// files, does not send the signal, and says why in the status command.
func TestRenewSignalBehindInit(t *testing.T) {
	const ttl = 20 * time.Second // a rotation in about 10 s
	e := rotatingEnv(t, ttl)
	r := e.startRefresher(t)
	p := e.podmanNode(t, renderHooksDir(t, e.config))
	// Podman 4.3 reads --annotation as CSV: quotes keep the commas.
	p.run(t, "wrapped", "while :; do sleep 1; done", "--init",
		`--annotation="`+annotation+`=[{cert_dir: /certs, renew_signal: SIGHUP}]"`)
	id := p.id(t, "wrapped")
	pid := p.pid(t, "wrapped")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("refresher log:\n%s", readFile(r.log))
		}
	})
	e.servedAndRotating(t, id, pid, ttl)
	time.Sleep(2 * time.Second)
	if now := p.pid(t, "wrapped"); now != pid {
		t.Fatalf("the container's init changed from %d to %d: the signal ended it", pid, now)
	}
	out, errOut, code := refresherCmd(t, "status", "--config", e.config)
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	if line := grepLine(out, id); !strings.Contains(line, "renew_signal SIGHUP not sent") || !strings.Contains(line, "podman-init") {
		t.Errorf("status row: %q", line)
	}
	if log := readFile(r.log); strings.Count(log, "without their reload signal") != 1 {
		t.Errorf("want one log line about the signal not sent:\n%s", log)
	}
}
