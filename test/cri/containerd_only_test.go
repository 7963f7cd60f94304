package cri

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// requiredPlugins is NRI's annotation that makes its default validator
// (enabled by the containerd-nri overlay's containerd-nri.toml) refuse a
// pod's containers while a plugin it names is not registered.
const requiredPlugins = "required-plugins.noderesource.dev/pod"

// containerdOnly: what only containerd, through NRI, has: the plugin's
// life next to containerd's.
func containerdOnly(t *testing.T, c *containerd) {
	t.Run("shim sockets stay under the test's root", func(t *testing.T) { shimSockets(t, c) })
	t.Run("SIGTERM stops the plugin; the validator holds pods until it is back", func(t *testing.T) { pluginDown(t, c) })
	t.Run("audit: plugin stopped and no validator", func(t *testing.T) { pluginAbsent(t, c) })
	t.Run("containerd restart: the plugin registers again", func(t *testing.T) { containerdRestart(t, c) })
	t.Run("reject_oci_hook_adjustment: an annotated pod is refused with containerd's line", func(t *testing.T) { hookRejected(t, c) })
}

// containerdRestart: containerd stops and starts again; spiffe-oci-nri
// stays up, registers again by itself, and the next annotated container
// gets its identity.
func containerdRestart(t *testing.T, c *containerd) {
	id := c.node.register(t, "shop", "default", time.Hour)
	c.stop(t)
	mark := fileSize(c.log)
	c.start(t)
	c.waitRegistered(t, mark)
	select {
	case <-c.nri.done:
		t.Fatalf("spiffe-oci-nri exited when containerd restarted; its log:\n%s", tail(c.nri.log, 20))
	default:
	}
	p := c.runPod(t, "after-restart", "shop", map[string]string{annotation: "- cert_dir: /certs\n", requiredPlugins: `["spiffe-oci-hook"]`})
	ctr := p.mustRun(t, "app", 0, printCert+"echo DONE")
	if got := certID(t, ctr.waitLog(t, "DONE")); got != id {
		t.Errorf("after containerd's restart the container read %s, want %s", got, id)
	}
}

// pluginDown: SIGTERM stops spiffe-oci-nri promptly (a DaemonSet rollout
// must not wait out its grace period). While it is down, NRI's default
// validator refuses the container of a pod that requires the plugin, with
// its line in crictl's error, and the container never runs; once the
// plugin is back, the kubelet's retry (a new attempt) gets its identity.
func pluginDown(t *testing.T, c *containerd) {
	id := c.node.register(t, "shop", "default", time.Hour)
	select {
	case <-c.nri.done:
		t.Fatalf("spiffe-oci-nri is not running; its log:\n%s", tail(c.nri.log, 20))
	default:
	}
	took, ok := c.nri.stop(t)
	if !ok {
		t.Fatalf("spiffe-oci-nri ignored SIGTERM (killed after %s); its log:\n%s", took, tail(c.nri.log, 20))
	}
	// The bound is a DaemonSet's grace period, not a benchmark; the time
	// is logged for the record.
	t.Logf("spiffe-oci-nri stopped %s after SIGTERM", took)
	if log := tail(c.nri.log, 5); !strings.Contains(log, "stopped") {
		t.Errorf("spiffe-oci-nri's log does not end with its stop:\n%s", log)
	}

	p := c.runPod(t, "required", "shop", map[string]string{annotation: "- cert_dir: /certs\n", requiredPlugins: `["spiffe-oci-hook"]`})
	ctr, err := p.run(t, "app", 0, "echo STARTED; "+idle)
	if err == nil {
		t.Fatalf("a container whose pod requires spiffe-oci-hook started while the plugin was down")
	}
	if want := `required plugin "spiffe-oci-hook" not present`; !strings.Contains(strings.ReplaceAll(err.Error(), `\"`, `"`), want) {
		t.Errorf("crictl's error lacks %q:\n%v", want, err)
	}
	notRun(t, c.runtime, p, ctr)

	c.nri = startNRI(t, c, c.node)
	again := p.mustRun(t, "app", 1, printCert+"echo DONE")
	if got := certID(t, again.waitLog(t, "DONE")); got != id {
		t.Errorf("once the plugin was back the container read %s, want %s", got, id)
	}
}

// shimSockets: the running pods' shims listen under the socket_dir the
// test gave containerd, not in /run/containerd.
func shimSockets(t *testing.T, c *containerd) {
	ents, err := os.ReadDir(filepath.Join(c.dir, "s"))
	if err != nil || len(ents) == 0 {
		t.Errorf("no shim socket under %s/s (%v)", c.dir, err)
	}
	if c.hostRunContainerd {
		return
	}
	if _, err := os.Stat("/run/containerd"); err == nil {
		t.Errorf("/run/containerd appeared while the test's containerd ran")
	}
}
