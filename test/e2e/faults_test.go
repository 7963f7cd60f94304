package e2e

// PID reuse against the real SPIRE agent, at the hook and at the refresher.
//
// How the pid number is reused on cue: the workload process is killed and
// reaped, then /proc/sys/kernel/ns_last_pid of the host's pid namespace is
// set to N-1 and the replacement is forked, so the kernel hands it pid N
// (ns_last_pid is the last pid allocated; the next fork takes the next free
// number). Another fork on the node can take N first; the helper retries
// until it gets N. A fresh pid namespace (unshare --pid) would make numbers
// predictable too, but the agent attests host pids, and the hook reads the
// state's pid in the host namespace, so the reuse must happen there.
//
// How the hook is caught mid-fetch: the OCI state carries only a pid, so a
// hook that starts after the pid was reused cannot tell, and no test can
// honestly expect it to. The window the hook defends is between pinning
// the pid (pidfd) and the agent attesting it. The test widens that window
// at will: it stops the SPIRE agent (SIGSTOP), runs the hook until it holds
// the pidfd and its connection to the agent, swaps the process behind the
// pid, and lets the agent continue (SIGCONT). The agent then attests the
// impostor, which has an entry of its own, and answers with the impostor's
// SVID; the hook must notice that the pinned process is gone and deliver
// nothing.

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
	rspec "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const (
	originalID = "spiffe://example.org/workload/original"
	impostorID = "spiffe://example.org/workload/impostor"
	// Neither is 0: waitSynced's sentinel entry (uid 0, sleep) may still
	// be on the agent for a while after it is deleted.
	originalUID = 2000
	impostorUID = 1000
)

// reuseEnv starts SPIRE with entries for the original workload (sleep as
// uid 2000) and for an impostor (sleep as uid 1000).
func reuseEnv(t *testing.T) (*env, string) {
	e := startEnv(t)
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	if sleep, err = filepath.EvalSymlinks(sleep); err != nil {
		t.Fatal(err)
	}
	e.spire.CreateEntry(t, originalID, []string{fmt.Sprintf("unix:uid:%d", originalUID), "unix:path:" + sleep}, time.Hour)
	e.spire.CreateEntry(t, impostorID, []string{fmt.Sprintf("unix:uid:%d", impostorUID), "unix:path:" + sleep}, time.Hour)
	e.waitSynced()
	return e, sleep
}

// startOriginal starts the original workload: sleep as uid 2000 in a
// mount namespace of its own, so that a delivery's mount (the hook enters
// the pid's mount namespace) vanishes with it instead of landing on the
// host.
func startOriginal(t *testing.T) *exec.Cmd {
	t.Helper()
	uid := strconv.Itoa(originalUID)
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// unshare and setpriv exec sleep; wait until they have, so the agent
	// sees sleep.
	testhelp.Eventually(t, 5*time.Second, "unshare exec'd sleep", func() bool {
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", cmd.Process.Pid))
		return filepath.Base(exe) == "sleep"
	})
	return cmd
}

// startWithPid starts sleep as uid with exactly pid want (see the file
// comment), retrying when another fork takes the number first.
func startWithPid(t *testing.T, want int, uid uint32) *exec.Cmd {
	t.Helper()
	for attempt := range 200 {
		if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(want-1)), 0); err != nil {
			// Root in the host's pid namespace can always write it: a
			// machine where this fails cannot run the pid-reuse test,
			// which is too important to skip quietly.
			t.Fatalf("cannot steer pid allocation (ns_last_pid): %v; the pid-reuse tests need root in the host's pid and user namespaces", err)
		}
		cmd := exec.Command("sleep", "60")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if cmd.Process.Pid == want {
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			t.Logf("pid %d reused after %d attempt(s)", want, attempt+1)
			return cmd
		}
		cmd.Process.Kill()
		cmd.Wait()
	}
	t.Fatalf("could not get pid %d after 200 forks", want)
	return nil
}

// agentPid finds the SPIRE agent this test started (a child of this
// process whose command line names this SPIRE's directory).
func (e *env) agentPid(t *testing.T) int {
	t.Helper()
	entries, _ := os.ReadDir("/proc")
	for _, d := range entries {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		args := strings.Split(string(cmdline), "\x00")
		if len(args) < 3 || filepath.Base(args[0]) != "spire-agent" || !strings.Contains(string(cmdline), e.spire.Dir) {
			continue
		}
		if i := strings.LastIndexByte(string(stat), ')'); i > 0 {
			if f := strings.Fields(string(stat)[i+1:]); len(f) > 1 && f[1] == strconv.Itoa(os.Getpid()) {
				return pid
			}
		}
	}
	t.Fatal("cannot find the SPIRE agent process")
	return 0
}

// pauseAgent stops the agent (SIGSTOP) until the returned resume is called.
func (e *env) pauseAgent(t *testing.T) (resume func()) {
	t.Helper()
	pid := e.agentPid(t)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume = func() {
		if !resumed {
			resumed = true
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}
	t.Cleanup(resume)
	return resume
}

// hookRun is a hook started in the background.
type hookRun struct {
	cmd    *exec.Cmd
	stderr strings.Builder
	done   chan struct{}
}

func (e *env) startHook(t *testing.T, b *bundle, pid int, ann string) *hookRun {
	t.Helper()
	b.save(t)
	state, _ := json.Marshal(rspec.State{
		Version: rspec.Version, ID: b.id, Status: rspec.StateCreating, Pid: pid, Bundle: b.dir,
		Annotations: map[string]string{annotation: ann},
	})
	h := &hookRun{cmd: exec.Command(hookBin, "--config", e.config), done: make(chan struct{})}
	h.cmd.Stdin = strings.NewReader(string(state))
	h.cmd.Stderr = &h.stderr
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { h.cmd.Wait(); close(h.done) }()
	t.Cleanup(func() { h.cmd.Process.Kill(); <-h.done })
	return h
}

// waitPinned waits until the hook holds a pidfd and a socket: it has pinned
// the container's process and is talking to the (stopped) agent.
func (h *hookRun) waitPinned(t *testing.T) {
	t.Helper()
	testhelp.Eventually(t, 5*time.Second, "hook holds a pidfd and an agent connection", func() bool {
		select {
		case <-h.done:
			t.Fatalf("the hook exited early: %s", h.stderr.String())
		default:
		}
		dir := fmt.Sprintf("/proc/%d/fd", h.cmd.Process.Pid)
		fds, _ := os.ReadDir(dir)
		var pidfd, sock bool
		for _, fd := range fds {
			l, _ := os.Readlink(filepath.Join(dir, fd.Name()))
			pidfd = pidfd || l == "anon_inode:[pidfd]"
			sock = sock || strings.HasPrefix(l, "socket:")
		}
		return pidfd && sock
	})
}

func (h *hookRun) wait(t *testing.T) (int, string) {
	t.Helper()
	select {
	case <-h.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the hook did not finish in 20 s")
	}
	return h.cmd.ProcessState.ExitCode(), h.stderr.String()
}

// TestPIDReuseDuringFetch: the container's process exits while the hook
// waits for the agent and its pid number is taken by another process that
// has an identity of its own. The hook fails, says why, and delivers
// nothing. The same steps without the swap deliver the original identity,
// so stopping the agent is not what makes the hook fail.
func TestPIDReuseDuringFetch(t *testing.T) {
	e, _ := reuseEnv(t)
	const ann = "- cert_dir: /certs\n"

	t.Run("control: no swap", func(t *testing.T) {
		orig := startOriginal(t)
		b := newBundle(t, []string{"/bin/true"})
		resume := e.pauseAgent(t)
		h := e.startHook(t, b, orig.Process.Pid, ann)
		h.waitPinned(t)
		time.Sleep(200 * time.Millisecond)
		resume()
		code, stderr := h.wait(t)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		if got := e.readRecord(b.id)["deliveries"].([]any)[0].(map[string]any)["delivered_spiffe_id"]; got != originalID {
			t.Errorf("delivered %v, want %s", got, originalID)
		}
		if code, msg := runBinary(t, hookBin, stoppedState(b), "--config", e.config); code != 0 {
			t.Fatalf("poststop: %d %s", code, msg)
		}
	})

	t.Run("pid reused while the agent attests", func(t *testing.T) {
		pidReusedDuringFetch(t, e, ann)
	})
	// The tokens come by pid as well, in the same exchange: the same
	// check keeps the impostor's JWT-SVID from being written.
	t.Run("pid reused while the agent attests, with a JWT-SVID", func(t *testing.T) {
		pidReusedDuringFetch(t, e, ann+"  jwt_svids: [{jwt_audience: db, jwt_svid_file_name: jwt.token}]\n  jwt_bundle_file_name: jwt_bundle.json\n")
	})
}

// pidReusedDuringFetch swaps the process behind the pid while the agent
// is stopped with the hook waiting on it: the hook must deliver nothing.
func pidReusedDuringFetch(t *testing.T, e *env, ann string) {
	orig := startOriginal(t)
	pid := orig.Process.Pid
	b := newBundle(t, []string{"/bin/true"})
	rootfsBefore := listTree(b.rootfs)
	resume := e.pauseAgent(t)
	h := e.startHook(t, b, pid, ann)
	h.waitPinned(t)

	orig.Process.Kill()
	orig.Wait()
	impostor := startWithPid(t, pid, impostorUID)
	resume()

	code, stderr := h.wait(t)
	e.checkHookRefused(t, b, rootfsBefore, code, stderr,
		"container "+b.id+":", "exited while its identity was fetched", "nothing delivered", fmt.Sprintf("pid %d", pid), "gone")
	if mounts, _ := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", impostor.Process.Pid)); strings.Contains(string(mounts), b.dir) {
		t.Errorf("something was mounted under %s in the impostor's mount namespace", b.dir)
	}
	// The agent does hand the impostor its own identity: the refusal
	// above is the hook's doing.
	e.spire.WaitForSVID(t, impostor.Process.Pid, impostorID, 10*time.Second)
}

func stoppedState(b *bundle) string {
	s, _ := json.Marshal(rspec.State{Version: rspec.Version, ID: b.id, Status: rspec.StateStopped, Bundle: b.dir})
	return string(s)
}

// TestRefresherPIDReuse: records naming a pid whose process was replaced
// (same number, other start time, an identity of its own) are never
// served: the refresher removes their state and writes no generation,
// whether it finds the record at start-up or sees it appear later.
func TestRefresherPIDReuse(t *testing.T) {
	e, _ := reuseEnv(t)
	orig := startOriginal(t)
	pid := orig.Process.Pid
	b := newBundle(t, []string{"/bin/true"})
	if code, msg := e.runHook(t, b, e.config, pid, "- cert_dir: /certs\n"); code != 0 {
		t.Fatalf("hook: exit %d: %s", code, msg)
	}
	atStart, later := b.id, b.id+"-later"
	recData, err := os.ReadFile(filepath.Join(e.stateDir, "records", atStart+".json"))
	if err != nil {
		t.Fatal(err)
	}
	// A second container with the same pid and start time, whose record
	// appears after the refresher is up (its files are already there).
	if out, err := exec.Command("cp", "-a", filepath.Join(e.stateDir, "containers", atStart), filepath.Join(e.stateDir, "containers", later)).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}

	orig.Process.Kill()
	orig.Wait()
	startWithPid(t, pid, impostorUID)

	// Any generation created in either delivery directory is a rewrite.
	w, err := fsnotify.NewWatcher()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, id := range []string{atStart, later} {
		if err := w.Add(filepath.Join(e.stateDir, "containers", id, "0")); err != nil {
			t.Fatal(err)
		}
	}
	var rewrites []string
	collect := func() {
		for {
			select {
			case ev := <-w.Events:
				if ev.Has(fsnotify.Create) {
					rewrites = append(rewrites, ev.Name)
				}
			default:
				return
			}
		}
	}

	r := e.startRefresher(t)
	// Ready comes after the first scan.
	if _, err := os.Stat(filepath.Join(e.stateDir, "containers", atStart)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state of the reused pid's container is still there after the first scan (%v)", err)
	}
	if _, err := os.Stat(filepath.Join(e.stateDir, "records", atStart+".json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record of the reused pid's container is still there after the first scan (%v)", err)
	}

	var rec map[string]any
	json.Unmarshal(recData, &rec)
	rec["id"] = later
	data, _ := json.Marshal(rec)
	tmp := filepath.Join(e.stateDir, "records", ".tmp."+later)
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(e.stateDir, "records", later+".json")); err != nil {
		t.Fatal(err)
	}
	testhelp.Eventually(t, 5*time.Second, "state of the later record removed", func() bool {
		_, err1 := os.Stat(filepath.Join(e.stateDir, "containers", later))
		_, err2 := os.Stat(filepath.Join(e.stateDir, "records", later+".json"))
		return errors.Is(err1, os.ErrNotExist) && errors.Is(err2, os.ErrNotExist)
	})
	time.Sleep(500 * time.Millisecond)
	collect()
	if len(rewrites) != 0 {
		t.Errorf("the refresher wrote for a reused pid: %v", rewrites)
	}
	log := readFile(r.log)
	for _, id := range []string{atStart, later} {
		if strings.Contains(log, `msg="serving container" container=`+id+" ") {
			t.Errorf("the refresher served %s:\n%s", id, log)
		}
		if !strings.Contains(log, `msg="removed container state" container=`+id+" ") {
			t.Errorf("no removal of %s logged:\n%s", id, log)
		}
	}
	if got := e.listState(); !clean(got) {
		t.Errorf("state directory holds %v", got)
	}
}
