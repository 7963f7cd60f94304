package audit

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// node is a fake node for the auditor: runtime state directories laid out
// as runc writes them (state.json naming the bundle), bundles with their
// config.json, real processes standing in for containers, and a state
// directory on tmpfs. The real runtimes are in test/e2e and test/cri.
type node struct {
	t testing.TB
	// statePad pads each state.json's config (benchmarks: the size of
	// runc's, which holds the whole libcontainer config).
	statePad string
	dir      string
	root     string // runc --root
	store    statedir.Store
	logs     bytes.Buffer
	cri      []string
}

func newNode(t testing.TB) *node {
	t.Helper()
	dir, state := testhelp.TempNode(t, "needs root: the state directory is a tmpfs mount", "audit-", "size=16m")
	n := &node{t: t, dir: dir, root: filepath.Join(dir, "runc"), store: statedir.Store{Dir: state}}
	os.MkdirAll(n.root, 0o700)
	if err := n.store.Init(); err != nil {
		t.Fatal(err)
	}
	return n
}

func (n *node) auditor() *Auditor {
	return New(n.store, func() config.Audit {
		return config.Audit{Interval: time.Second, RuntimeRoots: []string{n.root, filepath.Join(n.dir, "missing-root")}, CRISockets: n.cri}
	}, slog.New(slog.NewTextHandler(&n.logs, nil)))
}

// container lays out a runc container whose init is a real process
// (started unless created is true) with the given spec annotations and
// createRuntime hook.
type ctr struct {
	id   string
	pid  int
	proc *exec.Cmd
}

func (n *node) container(id string, ann map[string]string, hook bool, created bool) *ctr {
	n.t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	bundle := filepath.Join(n.dir, "bundles", id)
	os.MkdirAll(bundle, 0o755)
	spec := specs.Spec{Version: "1.2.0", Annotations: ann}
	if hook {
		spec.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/usr/libexec/oci/hooks.d/spiffe-oci-hook", Args: []string{"spiffe-oci-hook"}}}}
	}
	writeJSON(n.t, filepath.Join(bundle, "config.json"), spec)
	st, _ := process.StartTime(cmd.Process.Pid)
	sdir := filepath.Join(n.root, id)
	os.MkdirAll(sdir, 0o700)
	writeJSON(n.t, filepath.Join(sdir, "state.json"), map[string]any{
		"id": id, "init_process_pid": cmd.Process.Pid, "init_process_start": st,
		"config": map[string]any{"labels": []string{"bundle=" + bundle}, "mounts": n.statePad},
	})
	if created {
		unix.Mkfifo(filepath.Join(sdir, "exec.fifo"), 0o600)
	}
	return &ctr{id: id, pid: cmd.Process.Pid, proc: cmd}
}

// serve records a delivery for c, as the hook does.
func (n *node) serve(c *ctr) {
	n.t.Helper()
	st, _ := process.StartTime(c.pid)
	if err := n.store.Save(statedir.Record{ID: c.id, PID: c.pid, StartTime: st}); err != nil {
		n.t.Fatal(err)
	}
}

func writeJSON(t testing.TB, p string, v any) {
	t.Helper()
	data, _ := json.Marshal(v)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func crio(sandbox, pod, name string, extra map[string]string) map[string]string {
	m := map[string]string{crioSandboxID: sandbox, crioType: "container", crioPodName: pod, crioPodNS: "shop", annotations.CRIOContainerName: name}
	for k, v := range extra {
		m[k] = v
	}
	return m
}

var asks = map[string]string{annotations.Key: "- cert_dir: /certs\n"}

func byID(rep Result) map[string]Unserved {
	m := map[string]Unserved{}
	for _, u := range rep.Unserved {
		m[u.ID] = u
	}
	return m
}

// TestAuditCauses: each kind of container that asked and got nothing is
// reported with its cause; served, unannotated, created-not-started and
// sandbox containers are not.
func TestAuditCauses(t *testing.T) {
	n := newNode(t)
	served := n.container("served", crio("sb1", "web", "app", asks), true, false)
	n.serve(served)
	n.container("plain", crio("sb1", "web", "side", nil), false, false)
	n.container("nohook", crio("sb2", "api", "app", asks), false, false)
	n.container("empty", crio("sb3", "db", "app", map[string]string{annotations.Key: ""}), false, false)
	n.container("norecord", map[string]string{annotations.Key: "- cert_dir: /certs\n"}, true, false)
	fo := n.container("failopen", crio("sb4", "cache", "app", asks), true, false)
	st, _ := process.StartTime(fo.pid)
	n.store.SaveFailOpen(statedir.FailOpen{ID: "failopen", PID: fo.pid, StartTime: st, Error: "agent unreachable", Time: time.Now()})
	n.container("creating", crio("sb5", "new", "app", asks), true, true)
	n.container("infra", map[string]string{crioSandboxID: "sb2", crioType: "sandbox", annotations.Key: "- cert_dir: /certs\n"}, false, false)
	n.container("podman", map[string]string{podmanManager: podmanLibpod, annotations.Key: "- cert_dir: /certs\n"}, false, false)
	gone := n.container("gone", crio("sb6", "old", "app", asks), false, false)
	gone.proc.Process.Kill()
	gone.proc.Wait()

	a := n.auditor()
	rep := a.Run(context.Background())
	got := byID(rep)
	want := map[string]string{
		"nohook":   CauseHookNotConfigured,
		"empty":    CauseEmptyAnnotation,
		"norecord": CauseNoRecord,
		"failopen": CauseFailOpen,
		"podman":   CauseHookNotConfigured,
	}
	for id, cause := range want {
		if got[id].Cause != cause {
			t.Errorf("%s: cause %q, want %q (%+v)", id, got[id].Cause, cause, got[id])
		}
	}
	if len(got) != len(want) {
		t.Errorf("unserved %v, want exactly %v", rep.Unserved, want)
	}
	if rep.Checked != 6 {
		t.Errorf("checked %d containers, want the 6 running that asked", rep.Checked)
	}
	if u := got["nohook"]; u.Pod != "api" || u.Namespace != "shop" || u.Name != "app" || !strings.Contains(u.Detail, "hooks_dir") {
		t.Errorf("CRI-O container without the hook: %+v", u)
	}
	if u := got["podman"]; !strings.Contains(u.Detail, "--hooks-dir") {
		t.Errorf("Podman container without the hook: %+v", u)
	}
	if u := got["failopen"]; !strings.Contains(u.Detail, "agent unreachable") {
		t.Errorf("fail-open container: %+v", u)
	}
	if rep.FailOpen != 1 {
		t.Errorf("fail-open starts %d, want 1", rep.FailOpen)
	}
	if len(rep.Errors) != 0 {
		t.Errorf("errors: %v", rep.Errors)
	}
	// Each finding is logged once, with its cause, across audits.
	a.Run(context.Background())
	logs := n.logs.String()
	for id, cause := range want {
		if c := strings.Count(logs, "container="+id+" "); c != 1 {
			t.Errorf("%s logged %d times, want once:\n%s", id, c, logs)
		}
		if !strings.Contains(logs, "cause="+cause) {
			t.Errorf("no line with cause %s:\n%s", cause, logs)
		}
	}
	if again := a.Run(context.Background()); again.FailOpen != 1 {
		t.Errorf("the same fail-open start counted again: %d", again.FailOpen)
	}
}

// TestAuditUnmatchedName: a named annotation whose container name has a
// typo is reported once it has matched nothing for two audits in a row;
// one that names a container of the pod is not.
func TestAuditUnmatchedName(t *testing.T) {
	n := newNode(t)
	pod := map[string]string{annotations.Key + ".ap": "- cert_dir: /certs\n", annotations.Key + ".side": "- cert_dir: /certs\n"}
	side := n.container("side", crio("sb1", "web", "side", pod), true, false)
	n.serve(side)
	n.container("app", crio("sb1", "web", "app", pod), false, false)
	a := n.auditor()
	if rep := a.Run(context.Background()); len(rep.Unmatched) != 0 {
		t.Errorf("reported at the first audit, before the pod's containers can all be known: %+v", rep.Unmatched)
	}
	rep := a.Run(context.Background())
	if len(rep.Unmatched) != 1 || rep.Unmatched[0].Annotation != annotations.Key+".ap" || rep.Unmatched[0].Pod != "web" || rep.Unmatched[0].Namespace != "shop" {
		t.Fatalf("unmatched = %+v, want the .ap annotation of shop/web", rep.Unmatched)
	}
	if len(rep.Unserved) != 0 {
		t.Errorf("unserved = %+v: app did not ask (its name has no annotation)", rep.Unserved)
	}
	if !strings.Contains(n.logs.String(), "annotation names no container of its pod") {
		t.Errorf("not logged:\n%s", n.logs.String())
	}
}

// criServer is a CRI runtime service that answers ListPodSandbox.
type criServer struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	pods []*runtimeapi.PodSandbox
}

func (s *criServer) ListPodSandbox(context.Context, *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	return &runtimeapi.ListPodSandboxResponse{Items: s.pods}, nil
}

// TestAuditContainerdPodAnnotation: under containerd without
// spiffe-oci-nri, the pod's annotation is only in the CRI; its container
// has none and no hook. The audit finds the pod's request there and names
// the missing plugin.
func TestAuditContainerdPodAnnotation(t *testing.T) {
	n := newNode(t)
	sock := filepath.Join(n.dir, "cri.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	runtimeapi.RegisterRuntimeServiceServer(srv, &criServer{pods: []*runtimeapi.PodSandbox{
		{Id: "sb1", Metadata: &runtimeapi.PodSandboxMetadata{Name: "web", Namespace: "shop"}, Annotations: asks},
	}})
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	n.cri = []string{sock, filepath.Join(n.dir, "no-such.sock")}
	ctrd := map[string]string{annotations.ContainerdContainerType: "container", ctrdSandboxID: "sb1", annotations.ContainerdContainerName: "app"}
	n.container("app", ctrd, false, false)

	rep := n.auditor().Run(context.Background())
	u := byID(rep)["app"]
	if u.Cause != CauseNRIPluginAbsent || u.Pod != "web" || u.Namespace != "shop" || !strings.Contains(u.Detail, "spiffe-oci-nri") {
		t.Errorf("containerd container of a pod that asked: %+v (report %+v)", u, rep)
	}
	if len(rep.Errors) != 0 {
		t.Errorf("errors (a missing socket is not one): %v", rep.Errors)
	}
}

// TestAuditOnlyReads: audits change nothing under the runtime roots, the
// bundles or the state directory: not a file's content, mode or times.
func TestAuditOnlyReads(t *testing.T) {
	n := newNode(t)
	n.container("nohook", crio("sb2", "api", "app", asks), false, false)
	s := n.container("served", crio("sb1", "web", "app", asks), true, false)
	n.serve(s)
	os.MkdirAll(n.store.DeliveryDir("served", 0), 0o700)
	os.WriteFile(filepath.Join(n.store.DeliveryDir("served", 0), "svid.pem"), []byte("cert"), 0o600)
	before := tree(t, n.dir)
	a := n.auditor()
	for range 3 {
		a.Run(context.Background())
	}
	after := tree(t, n.dir)
	for p, v := range before {
		if after[p] != v {
			t.Errorf("%s changed: %s -> %s", p, v, after[p])
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("%s appeared", p)
		}
	}
}

// tree maps every path under dir to its mode, size, times and content hash.
func tree(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		var st unix.Stat_t
		if unix.Lstat(p, &st) != nil {
			return nil
		}
		sum := ""
		if d.Type().IsRegular() {
			data, _ := os.ReadFile(p)
			sum = fmt.Sprintf("%x", sha256.Sum256(data))
		}
		m[p] = fmt.Sprintf("%o %d %d.%d %d.%d %s", st.Mode, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ctim.Sec, st.Ctim.Nsec, sum)
		return nil
	})
	return m
}
