package refresh

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// trapper is a process that logs each SIGHUP and SIGUSR1 it gets to a file.
func (n *node) trapper(name string) (*exec.Cmd, string) {
	n.t.Helper()
	log := filepath.Join(n.dir, name+".signals")
	os.WriteFile(log, nil, 0o600)
	cmd := exec.Command("sh", "-c", `trap 'echo HUP >> "$0"' HUP; trap 'echo USR1 >> "$0"' USR1; echo ready >> "$0"; while :; do sleep 0.05; done`, log)
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	testhelp.Eventually(n.t, 5*time.Second, "trap installed", func() bool { return strings.Contains(readString(log), "ready") })
	return cmd, log
}

func readString(p string) string { b, _ := os.ReadFile(p); return string(b) }

// setRenewSignal gives delivery 0 of container id a renew_signal, as the
// hook records it from the annotation.
func (n *node) setRenewSignal(id, sig string) {
	n.t.Helper()
	rec, err := n.store.Load(id)
	if err != nil {
		n.t.Fatal(err)
	}
	rec.Deliveries[0].RenewSignal = sig
	if err := n.store.Save(rec); err != nil {
		n.t.Fatal(err)
	}
}

// TestRenewSignal: after a rotation the refresher sends each container's
// renew_signal to its process, once per rotation, and nothing to a
// container that did not ask, nor at its first look (nothing changed).
func TestRenewSignal(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	hup, hupLog := n.trapper("hup")
	usr1, usr1Log := n.trapper("usr1")
	quiet, quietLog := n.trapper("quiet")
	ids := map[string]string{}
	for name, p := range map[string]*exec.Cmd{"hup": hup, "usr1": usr1, "quiet": quiet} {
		ids[name] = n.deliver(p.Process.Pid)
	}
	n.setRenewSignal(ids["hup"], "SIGHUP")
	n.setRenewSignal(ids["usr1"], "SIGUSR1")
	r, _ := n.start()
	testhelp.Eventually(t, 5*time.Second, "containers served", func() bool { return r.Count() == 3 })

	before := n.cert(ids["hup"])
	n.agent.Rotate()
	testhelp.Eventually(t, 5*time.Second, "certificate rotated", func() bool { return !bytes.Equal(n.cert(ids["hup"]), before) })
	testhelp.Eventually(t, 5*time.Second, "SIGHUP and SIGUSR1 received", func() bool {
		return strings.Count(readString(hupLog), "HUP") == 1 && strings.Count(readString(usr1Log), "USR1") == 1
	})
	n.agent.Rotate()
	testhelp.Eventually(t, 5*time.Second, "a second SIGHUP after the second rotation", func() bool {
		return strings.Count(readString(hupLog), "HUP") == 2 && strings.Count(readString(usr1Log), "USR1") == 2
	})
	if got := readString(hupLog) + readString(usr1Log); strings.Contains(readString(hupLog), "USR1") || strings.Contains(readString(usr1Log), "HUP") {
		t.Errorf("a container got another's signal: %q", got)
	}
	if got := strings.TrimSpace(readString(quietLog)); got != "ready" {
		t.Errorf("the container without renew_signal got signals: %q", got)
	}
}

// TestRenewSignalNotSentWhenItWouldKill: a process that is not its PID
// namespace's init and has no handler (shareProcessNamespace, host PID)
// would die of SIGHUP. The refresher rotates its files, does not send the
// signal, and says why once, in the log and in the container's status.
func TestRenewSignalNotSentWhenItWouldKill(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	p := n.workloadProcess() // sleep: no handler, not a namespace's init
	id := n.deliver(p.Process.Pid)
	n.setRenewSignal(id, "SIGHUP")
	r, _ := n.start()
	testhelp.Eventually(t, 5*time.Second, "served", func() bool { return r.Count() == 1 })
	exited := make(chan struct{})
	go func() { p.Process.Wait(); close(exited) }()

	for range 2 {
		before := n.cert(id)
		n.agent.Rotate()
		testhelp.Eventually(t, 5*time.Second, "certificate rotated", func() bool { return !bytes.Equal(n.cert(id), before) })
	}
	select {
	case <-exited:
		t.Fatal("the renew_signal killed the container's process")
	case <-time.After(500 * time.Millisecond):
	}
	testhelp.Eventually(t, 5*time.Second, "status says why", func() bool {
		rep := r.Report()
		return len(rep.Containers) == 1 && strings.Contains(rep.Containers[0].Error, "renew_signal SIGHUP not sent")
	})
	if c := strings.Count(n.logs.String(), "without their reload signal"); c != 1 {
		t.Errorf("logged %d times, want once:\n%s", c, n.logs.String())
	}
}
