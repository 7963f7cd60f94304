package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/cluster/localcluster"
)

// uninstallGrace is the refresher_grace the CRI-O test's upgrade sets
// (the default, 2m, would make the uninstall scenario wait that long).
const uninstallGrace = 30 * time.Second

const (
	projectSelector = "app.kubernetes.io/name=spiffe-oci-hook"
	hostHook        = "/opt/spiffe-oci-hook/bin/spiffe-oci-hook"
	refresherAlive  = "/run/spiffe-oci-hook/refresher.alive"
)

// shortGraceConfig writes the node config the release runs now, with
// refresher_grace set to uninstallGrace, for helm's --set-file nodeConfig.
func shortGraceConfig(c *localcluster.Cluster) (string, error) {
	out, err := c.Kubectl("-n", localcluster.ProjectNamespace, "get", "configmap", "spiffe-oci-hook-node", "-o", `jsonpath={.data.config\.yaml}`)
	if err != nil {
		return "", err
	}
	re := regexp.MustCompile(`(?m)^refresher_grace: .*$`)
	if !re.Match(out) {
		return "", fmt.Errorf("the release's node config has no refresher_grace line:\n%s", out)
	}
	cfg := re.ReplaceAll(out, []byte("refresher_grace: "+uninstallGrace.String()))
	path := filepath.Join(c.Dir, "node-config.yaml")
	return path, os.WriteFile(path, cfg, 0o644)
}

// hostHookVersion runs the hook binary the DaemonSet installed on the host.
func hostHookVersion(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(hostHook, "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("%s --version: %v\n%s", hostHook, err, out)
	}
	return strings.TrimSpace(string(out))
}

// projectPod is one of the DaemonSet's pods.
type projectPod struct {
	name, image, ready string
	deleting           bool
}

// projectPods lists the DaemonSet's pods.
func (e *env) projectPods(t *testing.T) []projectPod {
	t.Helper()
	out, err := e.Kubectl("-n", localcluster.ProjectNamespace, "get", "pods", "-l", projectSelector, "-o",
		`jsonpath={range .items[*]}{.metadata.name}|{.spec.containers[0].image}|{.status.conditions[?(@.type=="Ready")].status}|{.metadata.deletionTimestamp}{"\n"}{end}`)
	if err != nil {
		t.Fatal(err)
	}
	var pods []projectPod
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Split(line, "|"); len(f) == 4 {
			pods = append(pods, projectPod{name: f[0], image: f[1], ready: f[2], deleting: f[3] != ""})
		}
	}
	return pods
}

// pod creates a bare annotated pod for the default service account of ns.
func (e *env) pod(t *testing.T, ns, name string) {
	t.Helper()
	pod := fmt.Sprintf("apiVersion: v1\nkind: Pod\n%s", strings.Replace(e.podSpec("default", ""), "metadata:\n", "metadata:\n  name: "+name+"\n  namespace: "+ns+"\n", 1))
	if _, err := e.KubectlStdin(pod, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
}

// waitRotation waits for the certificate in a pod's files to change from
// before (e.serial fails on an expired one).
func (e *env) waitRotation(t *testing.T, ns, pod, before string, d time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		after := e.serial(t, ns, pod)
		if after != before {
			return after
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s/%s: no rotation within %s (serial %s)", ns, pod, d, before)
		}
		time.Sleep(2 * time.Second)
	}
}

// upgrade: the install is upgraded to UpgradeImage (binaries reporting
// UpgradeVersion) while annotated pods run. The DaemonSet rolls to a Ready
// pod of the new image; a running pod's files stay valid and keep
// rotating (60 s SVIDs); a pod created while the old pod is going away
// starts with its identity (at once or after the kubelet's retry), never
// without; the hook on the host is the new binary.
func upgrade(t *testing.T, e *env) {
	if e.rotatingNS == "" {
		t.Skip("needs twoNamespaces")
	}
	running := e.podNames(t, e.rotatingNS)[0]
	before := e.serial(t, e.rotatingNS, running)
	// The pod created during the rollout has its own namespace and entry.
	const ns = "upgrade"
	e.namespace(t, ns)
	want := e.register(t, ns, "default", time.Hour)
	if v := hostHookVersion(t); strings.Contains(v, localcluster.UpgradeVersion) {
		t.Fatalf("the host's hook reports %q before the upgrade", v)
	}
	old := e.projectPods(t)
	if len(old) != 1 {
		t.Fatalf("want one DaemonSet pod before the upgrade, have %+v", old)
	}
	oldPod := old[0].name

	start := time.Now()
	if err := e.upgrade(e.Cluster); err != nil {
		t.Fatal(err)
	}
	// Create a pod once the old DaemonSet pod is going away: the refresher
	// is stopping or stopped, the new one not yet serving.
	deadline := time.Now().Add(2 * time.Minute)
	for going := false; !going; {
		going = true
		for _, p := range e.projectPods(t) {
			if p.name == oldPod && !p.deleting {
				going = false
			}
		}
		if !going {
			if time.Now().After(deadline) {
				t.Fatalf("the old DaemonSet pod %s is not replaced 2 minutes after the upgrade", oldPod)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	e.pod(t, ns, "during-upgrade")
	t.Logf("pod during-upgrade created %.1fs after the upgrade began, the old DaemonSet pod going away", time.Since(start).Seconds())

	if err := e.Rollout(localcluster.ProjectNamespace, localcluster.ProjectDaemonSet, 3*time.Minute); err != nil {
		describe(t, e.Cluster, localcluster.ProjectNamespace)
		t.Fatal(err)
	}
	deadline = time.Now().Add(2 * time.Minute)
	for {
		pods := e.projectPods(t)
		if len(pods) == 1 && pods[0].name != oldPod && pods[0].ready == "True" && !pods[0].deleting &&
			(pods[0].image == localcluster.UpgradeImage || pods[0].image == localcluster.UpgradeReleaseImage) {
			t.Logf("DaemonSet rolled %.1fs after the upgrade: pod %s Ready, image %s", time.Since(start).Seconds(), pods[0].name, pods[0].image)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no single Ready DaemonSet pod of the new image 2 minutes after the rollout: %+v", pods)
		}
		time.Sleep(time.Second)
	}
	if v := hostHookVersion(t); !strings.Contains(v, localcluster.UpgradeVersion) {
		t.Fatalf("the host's hook reports %q after the upgrade, want %s", v, localcluster.UpgradeVersion)
	} else {
		t.Logf("%s --version: %s", hostHook, v)
	}

	// The pod created during the rollout: started with its identity,
	// possibly after waiting; if it had started without one, its log
	// would hold no certificate and podID would fail.
	if _, err := e.Kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/during-upgrade", "--timeout=5m"); err != nil {
		describe(t, e.Cluster, ns)
		t.Fatal(err)
	}
	if got := e.podID(t, ns, "during-upgrade"); got != want {
		t.Fatalf("the pod created during the upgrade printed %s, want %s", got, want)
	}
	restarts, _ := e.Kubectl("-n", ns, "get", "pod", "during-upgrade", "-o", "jsonpath={.status.containerStatuses[0].restartCount}")
	t.Logf("pod during-upgrade started with its identity %s (restarts %s)", want, restarts)

	// The pod that ran through the upgrade: its files stay valid and
	// rotate, now by the new refresher.
	if got := e.serial(t, e.rotatingNS, running); got != before {
		t.Logf("pod %s rotated during the upgrade (serial %s -> %s)", running, before, got)
		before = got
	}
	after := e.waitRotation(t, e.rotatingNS, running, before, 2*time.Minute)
	t.Logf("pod %s rotated after the upgrade (serial %s -> %s)", running, before, after)
}

// uninstall: after helm uninstall / kubectl delete -k, an annotated pod
// does not start with an identity that nobody rotates. On CRI-O the hook
// stays on the host, and once refresher_grace has passed since the last
// refresher's last heartbeat it refuses the container with its line. On
// containerd nothing injects the hook any more, and NRI's validator holds
// the pod, which requires the plugin.
func uninstall(t *testing.T, e *env) {
	const ns = "after-uninstall"
	e.namespace(t, ns)
	// Registered: the pod is refused for want of a refresher, not of an
	// entry.
	e.register(t, ns, "default", time.Hour)
	if err := e.uninstall(e.Cluster); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for len(e.projectPods(t)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the DaemonSet's pods are still there 2 minutes after the uninstall: %+v", e.projectPods(t))
		}
		time.Sleep(time.Second)
	}
	line := `required plugin "spiffe-oci-hook" not present`
	if e.Runtime == "crio" {
		line = "no spiffe-oci-refresher has served this node since"
		cfg, err := os.ReadFile("/etc/spiffe-oci-hook/config.yaml")
		if err != nil || !strings.Contains(string(cfg), "refresher_grace: "+uninstallGrace.String()) {
			t.Fatalf("the host's node config does not hold the upgrade's refresher_grace %s: %v\n%s", uninstallGrace, err, cfg)
		}
		// The hook admits containers for refresher_grace after the last
		// heartbeat (the window a rolling update needs); wait it out.
		fi, err := os.Stat(refresherAlive)
		if err != nil {
			t.Fatal(err)
		}
		wait := time.Until(fi.ModTime().Add(uninstallGrace + 5*time.Second))
		t.Logf("last refresher heartbeat %s; waiting %s for refresher_grace %s to pass", fi.ModTime().UTC().Format(time.RFC3339), wait.Round(time.Second), uninstallGrace)
		time.Sleep(wait)
	}
	e.pod(t, ns, "orphan")
	deadline = time.Now().Add(90 * time.Second)
	var out string
	for {
		b, err := e.Kubectl("-n", ns, "describe", "pod", "orphan")
		out = strings.ReplaceAll(string(b), `\"`, `"`)
		if err == nil && strings.Contains(out, line) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kubectl describe pod shows no line %q:\n%s", line, out)
		}
		time.Sleep(time.Second)
	}
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, line) {
			t.Logf("kubectl describe pod: %s", strings.TrimSpace(l))
			break
		}
	}
	// It never ran: still waiting, never terminated, no log. A while
	// later (past the kubelet's first retries) still the same.
	for i, pause := range []time.Duration{0, 15 * time.Second} {
		time.Sleep(pause)
		// The waiting message quotes the error ("error running hook"):
		// look at the state's keys, not its text.
		st, err := e.Kubectl("-n", ns, "get", "pod", "orphan", "-o", "jsonpath={.status.containerStatuses[0].state.waiting.reason}|"+
			"{.status.containerStatuses[0].state.running}{.status.containerStatuses[0].state.terminated}{.status.containerStatuses[0].lastState.terminated}")
		if err != nil {
			t.Fatal(err)
		}
		if reason, ran, _ := strings.Cut(string(st), "|"); reason == "" || ran != "" {
			t.Fatalf("check %d: the pod after the uninstall is not only waiting (waiting reason|running, terminated, last terminated): %s", i, st)
		}
		if logs, _ := e.Kubectl("-n", ns, "logs", "orphan"); strings.Contains(string(logs), "SPIFFE ID") {
			t.Fatalf("the pod after the uninstall ran:\n%s", logs)
		}
	}
}
