package cri

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// runtime is a running CRI runtime (CRI-O or containerd) on a node, driven
// through crictl.
type runtime struct {
	name   string // "crio" or "containerd"
	node   *node
	dir    string // the runtime's own temp root
	crictl string // crictl's config file (endpoints, timeout)
	logs   string // pod log directories
	// mountinfo lists the mounts of the runtime's mount namespace, where
	// its containers' mounts are.
	mountinfo string
	// cgroupParents are the pod cgroups this runtime's pods used, removed
	// (with /kubepods/besteffort and /kubepods) when the test ends, as the
	// kubelet would remove them.
	mu            sync.Mutex
	cgroupParents []string
}

// newRuntime writes crictl's configuration for endpoint.
func newRuntime(t *testing.T, name string, n *node, dir, socket string) *runtime {
	t.Helper()
	r := &runtime{name: name, node: n, dir: dir, crictl: filepath.Join(dir, "crictl.yaml"), logs: filepath.Join(dir, "pods"), mountinfo: "/proc/self/mountinfo"}
	cfg := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 60\n", socket, socket)
	if err := os.WriteFile(r.crictl, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeCgroups(r.cgroupParents) })
	return r
}

// run runs crictl and returns its stdout, or an error holding its stderr.
func (r *runtime) run(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(toolDir, "crictl"), append([]string{"--config", r.crictl}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("crictl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// must is run, failing the test on error.
func (r *runtime) must(t *testing.T, args ...string) string {
	t.Helper()
	out, err := r.run(args...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// pod is a Kubernetes pod as the kubelet hands it to the runtime.
type pod struct {
	name, ns, uid, sa string
	annotations       map[string]string
	id                string         // sandbox id, once running
	config            map[string]any // the sandbox config, as crictl create wants it again
	logDir            string
	rt                *runtime
}

func newUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// Namespace modes of the CRI (runtime.v1.NamespaceMode).
const (
	nsPod       = 0
	nsContainer = 1
	nsNode      = 2
)

// namespaceOptions are what the kubelet sets for a hostNetwork pod that
// does not share its process namespace; CRI-O wants the pid mode on the
// containers too.
var namespaceOptions = map[string]any{"network": nsNode, "pid": nsContainer, "ipc": nsPod}

// runPod makes the kubelet know a pod and runs its sandbox with crictl
// runp, with what the kubelet sets: the pod's annotations, the
// io.kubernetes.pod.* labels, and the cgroup parent of a BestEffort pod.
func (r *runtime) runPod(t *testing.T, name, ns string, annotations map[string]string) *pod {
	t.Helper()
	p := r.newPod(name, ns, "default", annotations)
	t.Cleanup(func() { p.remove() })
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	return p
}

// newPod is a pod of service account sa, not yet known to the kubelet
// nor run; start does both. It is safe to start pods concurrently.
func (r *runtime) newPod(name, ns, sa string, annotations map[string]string) *pod {
	return &pod{name: name, ns: ns, uid: newUID(), sa: sa, annotations: annotations, rt: r}
}

// start makes the kubelet know the pod and runs its sandbox (crictl
// runp); the caller removes it.
func (p *pod) start() error {
	r := p.rt
	r.node.kubelet.add(p)
	parent := "/kubepods/besteffort/pod" + p.uid
	r.mu.Lock()
	r.cgroupParents = append(r.cgroupParents, parent)
	r.mu.Unlock()
	p.logDir = filepath.Join(r.logs, fmt.Sprintf("%s_%s_%s", p.ns, p.name, p.uid))
	p.config = map[string]any{
		"metadata":      map[string]any{"name": p.name, "namespace": p.ns, "uid": p.uid, "attempt": 0},
		"log_directory": p.logDir,
		"labels":        p.labels(),
		"annotations":   p.annotations,
		"linux": map[string]any{
			"cgroup_parent":    parent,
			"security_context": map[string]any{"namespace_options": namespaceOptions},
		},
	}
	// The kubelet makes the pod's log directory before the sandbox.
	if err := os.MkdirAll(p.logDir, 0o755); err != nil {
		return err
	}
	path, err := writeJSONFile(r.dir, "pod", p.config)
	if err != nil {
		return err
	}
	out, err := r.run("runp", path)
	if err != nil {
		return err
	}
	p.id = strings.TrimSpace(out)
	return nil
}

func (p *pod) labels() map[string]string {
	return map[string]string{
		"io.kubernetes.pod.name":      p.name,
		"io.kubernetes.pod.namespace": p.ns,
		"io.kubernetes.pod.uid":       p.uid,
	}
}

// remove stops and removes the pod and its containers (crictl stopp,
// rmp), as the kubelet does when the pod is deleted.
func (p *pod) remove() error {
	if p.id == "" {
		return nil
	}
	// The kubelet stops each container (with the pod's grace period)
	// before the sandbox.
	out, _ := p.rt.run("ps", "-q", "--pod", p.id)
	for _, id := range strings.Fields(out) {
		p.rt.run("stop", "--timeout", "5", id)
	}
	if _, err := p.rt.run("stopp", p.id); err != nil {
		return err
	}
	if _, err := p.rt.run("rmp", p.id); err != nil {
		return err
	}
	p.id = ""
	return nil
}

// container is one container of a pod.
type container struct {
	pod     *pod
	name    string
	attempt int
	id      string
}

// create creates a container running script (busybox sh) in the pod, with
// what the kubelet sets: the io.kubernetes.container.name label (and the
// pod labels), the restart count annotation, the log path under the pod's
// log directory. It returns crictl's error, which carries the runtime's
// (and a failing hook's) message.
func (p *pod) create(t *testing.T, name string, attempt int, script string) (*container, error) {
	t.Helper()
	return p.createWith(name, attempt, script)
}

// mount is a host path bound into a container (a CRI Mount).
type mount struct {
	host, container string
	readonly        bool
}

// createWith is create with host paths mounted into the container, safe
// to call concurrently.
func (p *pod) createWith(name string, attempt int, script string, mounts ...mount) (*container, error) {
	labels := p.labels()
	labels["io.kubernetes.container.name"] = name
	var ms []map[string]any
	for _, m := range mounts {
		ms = append(ms, map[string]any{"host_path": m.host, "container_path": m.container, "readonly": m.readonly})
	}
	cfg := map[string]any{
		"metadata": map[string]any{"name": name, "attempt": attempt},
		"image":    map[string]any{"image": busyboxImage},
		"command":  []string{"/bin/sh", "-c", script},
		"labels":   labels,
		"mounts":   ms,
		"annotations": map[string]string{
			"io.kubernetes.container.restartCount":           fmt.Sprint(attempt),
			"io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
		},
		"log_path": fmt.Sprintf("%s/%d.log", name, attempt),
		"linux": map[string]any{
			"security_context": map[string]any{"namespace_options": namespaceOptions},
		},
	}
	// ... and each container's before creating it.
	if err := os.MkdirAll(filepath.Join(p.logDir, name), 0o755); err != nil {
		return nil, err
	}
	ctrPath, err := writeJSONFile(p.rt.dir, "ctr", cfg)
	if err != nil {
		return nil, err
	}
	podPath, err := writeJSONFile(p.rt.dir, "pod", p.config)
	if err != nil {
		return nil, err
	}
	out, err := p.rt.run("create", p.id, ctrPath, podPath)
	if err != nil {
		return nil, err
	}
	return &container{pod: p, name: name, attempt: attempt, id: strings.TrimSpace(out)}, nil
}

// start starts the container (crictl start).
func (c *container) start() error {
	_, err := c.pod.rt.run("start", c.id)
	return err
}

// run creates and starts a container; under CRI-O a failing hook fails
// the create, under containerd the start.
func (p *pod) run(t *testing.T, name string, attempt int, script string) (*container, error) {
	t.Helper()
	c, err := p.create(t, name, attempt, script)
	if err != nil {
		return nil, err
	}
	if err := c.start(); err != nil {
		return c, err
	}
	return c, nil
}

// mustRun is run, failing the test on error.
func (p *pod) mustRun(t *testing.T, name string, attempt int, script string) *container {
	t.Helper()
	c, err := p.run(t, name, attempt, script)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// state is the container's CRI state (CONTAINER_RUNNING, ..._EXITED, ...).
func (c *container) state(t *testing.T) string {
	t.Helper()
	var st struct {
		Status struct {
			State string `json:"state"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(c.pod.rt.must(t, "inspect", "-o", "json", c.id)), &st); err != nil {
		t.Fatal(err)
	}
	return st.Status.State
}

// logs is what the container has printed so far (crictl logs).
func (c *container) logs(t *testing.T) string {
	t.Helper()
	return c.pod.rt.must(t, "logs", c.id)
}

// waitLog waits until the container's log holds want, and returns it.
func (c *container) waitLog(t *testing.T, want string) string {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, _ := c.pod.rt.run("logs", c.id)
		if strings.Contains(out, want) {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: container %s never printed %q; log:\n%s", c.pod.rt.name, c.name, want, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitExited waits until the container has exited.
func (c *container) waitExited(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for c.state(t) != "CONTAINER_EXITED" {
		if time.Now().After(deadline) {
			t.Fatalf("%s: container %s did not exit", c.pod.rt.name, c.name)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// stop stops the container (crictl stop, as the kubelet's kill).
func (c *container) stop(t *testing.T) {
	t.Helper()
	c.pod.rt.must(t, "stop", "--timeout", "2", c.id)
}

// remove removes the container (crictl rm, as the kubelet's container
// garbage collection).
func (c *container) remove(t *testing.T) {
	t.Helper()
	c.pod.rt.must(t, "rm", "-f", c.id)
}

// containers lists the ids of all the pod's containers, in any state.
func (p *pod) containers(t *testing.T) []string {
	t.Helper()
	return strings.Fields(p.rt.must(t, "ps", "-a", "-q", "--pod", p.id))
}

var jsonSeq atomic.Int64

func writeJSON(t *testing.T, dir, kind string, v any) string {
	t.Helper()
	path, err := writeJSONFile(dir, kind, v)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// writeJSONFile writes v to a new file under dir, safe to call
// concurrently.
func writeJSONFile(dir, kind string, v any) (string, error) {
	path := filepath.Join(dir, fmt.Sprintf("%s-%d.json", kind, jsonSeq.Add(1)))
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return "", err
	}
	return path, os.WriteFile(path, data, 0o644)
}

// removeCgroups removes the pod cgroups, what is left under them (CRI-O's
// crio-conmon-<id> children under cgroupfs) and the kubepods parents from
// every hierarchy, where empty: the kubelet creates and removes them, the
// runtimes only their containers'.
func removeCgroups(parents []string) {
	roots, _ := filepath.Glob("/sys/fs/cgroup/*")
	roots = append(roots, "/sys/fs/cgroup")
	for _, root := range roots {
		for _, p := range parents {
			var dirs []string
			filepath.WalkDir(filepath.Join(root, p), func(path string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, path)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				os.Remove(dirs[i])
			}
		}
		os.Remove(filepath.Join(root, "kubepods", "besteffort"))
		os.Remove(filepath.Join(root, "kubepods"))
	}
}
