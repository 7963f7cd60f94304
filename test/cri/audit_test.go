package cri

// The refresher's audit under CRI-O and containerd: containers that asked
// for an identity and run without one are reported with their cause, a
// typo'd container name is reported, and a correctly served node reports
// nothing over every scenario of this package (checkAudit).

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/audit"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
)

const auditConfig = `refresher:
  audit:
    interval: 1s
    runtime_roots: ["/tmp/cri-crio-*/runc", "/tmp/cri-ctrd-*/runc/*"]
    cri_sockets: ["/tmp/cri-ctrd-*/containerd.sock"]
`

// report is the running refresher's last audit.
func (n *node) report(t *testing.T) audit.Result {
	t.Helper()
	rep, err := status.NewClient(filepath.Join(n.stateDir, "refresher.sock")).Report(context.Background())
	if err != nil {
		return audit.Result{}
	}
	return rep.Audit
}

// waitUnserved waits until the audit reports container id, and returns
// the finding; the time it took is logged, not asserted.
func (n *node) waitUnserved(t *testing.T, id string) audit.Unserved {
	t.Helper()
	start := time.Now()
	deadline := start.Add(30 * time.Second)
	for {
		for _, u := range n.report(t).Unserved {
			if u.ID == id {
				t.Logf("reported %s after the container started (audit interval 1s): %s: %s", time.Since(start).Round(10*time.Millisecond), u.Cause, u.Detail)
				return u
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the audit never reported container %s; last audit %+v; refresher log:\n%s", id, n.report(t), tail(n.refLog, 20))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

var (
	unservedLine = regexp.MustCompile(`msg="container running without its identity" container=(\S+)`)
	auditLine    = regexp.MustCompile(`msg=audit checked=(\d+)`)
)

// checkAudit: when the node's refresher stops, its audit must not have
// reported a container the tests did not make go without its identity.
func (n *node) checkAudit(t *testing.T) {
	data, _ := os.ReadFile(n.refLog)
	checked := 0
	for _, m := range auditLine.FindAllStringSubmatch(string(data), -1) {
		v, _ := strconv.Atoi(m[1])
		checked = max(checked, v)
	}
	bad := 0
	for _, m := range unservedLine.FindAllStringSubmatch(string(data), -1) {
		if _, ok := n.expected.Load(m[1]); ok {
			continue
		}
		bad++
		t.Errorf("audit false positive: container %s reported without its identity", m[1])
	}
	t.Logf("audit: up to %d running annotated containers checked at once over the scenarios; %d false positives", checked, bad)
	if checked == 0 && !n.shortLived {
		t.Errorf("the audit never saw an annotated container: it did not read this runtime's state")
	}
}

// typoName: a pod's named annotation with a typo in the container name
// (container.ap for the container app) gives no container an identity; the
// audit reports the annotation once the pod's containers are known.
func typoName(t *testing.T, r *runtime) {
	p := r.runPod(t, "typo", "shop", map[string]string{annotation + ".ap": "- cert_dir: /certs\n"})
	app := p.mustRun(t, "app", 0, "echo STARTED; "+idle)
	app.waitLog(t, "STARTED")
	start := time.Now()
	deadline := start.Add(30 * time.Second)
	for {
		for _, u := range r.node.report(t).Unmatched {
			if u.Annotation == annotation+".ap" && u.Pod == "typo" && u.Namespace == "shop" {
				t.Logf("reported %s after the container started: %+v", time.Since(start).Round(10*time.Millisecond), u)
				if len(u.Containers) != 1 || u.Containers[0] != "app" {
					t.Errorf("containers %q, want [app]", u.Containers)
				}
				if log, _ := os.ReadFile(r.node.refLog); !strings.Contains(string(log), "annotation names no container of its pod") {
					t.Errorf("no log line")
				}
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the typo'd annotation was never reported; last audit %+v", r.node.report(t))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// hooksDirMissing: CRI-O reads no directory that holds the hook's JSON
// (as stock CRI-O, which reads only /usr/share/containers/oci/hooks.d).
// The JSON is moved out of the directory the drop-in names; CRI-O's hook
// monitor drops it; an annotated pod's container starts without the hook,
// and the audit reports it with its pod and cause.
func hooksDirMissing(t *testing.T, r *runtime) {
	n := r.node
	n.register(t, "shop", "default", time.Hour)
	json := filepath.Join(n.hooksDir, "spiffe-oci-hook.json")
	aside := filepath.Join(n.dir, "spiffe-oci-hook.json.aside")
	if err := os.Rename(json, aside); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			os.Rename(aside, json)
			time.Sleep(time.Second) // CRI-O's monitor picks it up again
		}
	}
	t.Cleanup(restore)
	time.Sleep(time.Second) // CRI-O's monitor drops it
	p := r.runPod(t, "nohooks", "shop", unnamed)
	app := p.mustRun(t, "app", 0, "echo STARTED; "+idle)
	app.waitLog(t, "STARTED")
	if got := n.statePaths(app.id); len(got) > 0 {
		t.Fatalf("CRI-O still ran the hook after its JSON left the hooks directory: %v", got)
	}
	n.expected.Store(app.id, true)
	u := n.waitUnserved(t, app.id)
	if u.Cause != audit.CauseHookNotConfigured || !strings.Contains(u.Detail, "CRI-O") || u.Pod != "nohooks" || u.Namespace != "shop" || u.Name != "app" {
		t.Errorf("finding %+v", u)
	}
	app.stop(t)
	restore()
}

// pluginAbsent: spiffe-oci-nri is stopped and the pod names no
// required-plugins, so NRI's validator does not hold it: the container
// starts without the annotation in its spec and without the hook. The
// audit finds the pod's annotation through the CRI and names the plugin.
func pluginAbsent(t *testing.T, c *containerd) {
	n := c.node
	n.register(t, "shop", "default", time.Hour)
	c.nri.stop(t)
	defer func() { c.nri = startNRI(t, c, n) }()
	p := c.runPod(t, "noplugin", "shop", unnamed)
	app := p.mustRun(t, "app", 0, "echo STARTED; "+idle)
	app.waitLog(t, "STARTED")
	n.expected.Store(app.id, true)
	u := n.waitUnserved(t, app.id)
	if u.Cause != audit.CauseNRIPluginAbsent || !strings.Contains(u.Detail, "spiffe-oci-nri") || u.Pod != "noplugin" || u.Namespace != "shop" || u.Name != "app" {
		t.Errorf("finding %+v", u)
	}
	app.stop(t)
}
