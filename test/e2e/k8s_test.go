package e2e

// Two containers with different identities on one node. runc containers
// look alike to SPIRE's unix attestor, so this test gives the agent the k8s
// workload attestor with a fake kubelet (its read-only port on 127.0.0.1
// serving /pods) and places each container in a pod's cgroup
// (/kubepods/besteffort/pod<uid>/<container id>). With
// disable_container_selectors the attestor answers from the pod alone, as
// it must at createRuntime, before the kubelet knows the container.

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"
)

type fakePod struct {
	name, uid string
}

// startKubelet serves the pods on a free 127.0.0.1 port and returns it.
func startKubelet(t *testing.T, pods ...fakePod) int {
	t.Helper()
	var items []map[string]any
	for _, p := range pods {
		items = append(items, map[string]any{
			"metadata": map[string]any{"name": p.name, "namespace": "default", "uid": p.uid},
			"spec":     map[string]any{"serviceAccountName": "default", "nodeName": "node"},
			"status":   map[string]any{"phase": "Pending"},
		})
	}
	body, _ := json.Marshal(map[string]any{"kind": "PodList", "apiVersion": "v1", "items": items})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/pods" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	}))
	srv.Listener.Close()
	srv.Listener = lis
	srv.Start()
	t.Cleanup(srv.Close)
	return lis.Addr().(*net.TCPAddr).Port
}

// k8sAttestor is the agent's k8s workload attestor pointed at a fake
// kubelet, answering with pod-level selectors only, as it must when the
// hook asks before the container runs.
func k8sAttestor(kubeletPort int) string {
	return fmt.Sprintf(`    WorkloadAttestor "k8s" {
        plugin_data {
            kubelet_read_only_port = %d
            disable_container_selectors = true
            use_new_container_locator = false
            node_name = "node"
        }
    }`, kubeletPort)
}

func newUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// inPod places the bundle's container in pod uid's cgroup under a fresh
// 64-hex container id, and removes the cgroup directories afterwards.
func (b *bundle) inPod(t *testing.T, podUID string) {
	t.Helper()
	c := make([]byte, 32)
	rand.Read(c)
	path := fmt.Sprintf("/kubepods/besteffort/pod%s/%s", podUID, hex.EncodeToString(c))
	b.SetLinuxCgroupsPath(path)
	t.Cleanup(func() {
		// After runc delete (registered later, so run earlier) only the
		// parents this test created remain; rmdir them where empty.
		roots, _ := filepath.Glob("/sys/fs/cgroup/*")
		roots = append(roots, "/sys/fs/cgroup")
		for _, root := range roots {
			for _, d := range []string{path, filepath.Dir(path), "/kubepods/besteffort", "/kubepods"} {
				os.Remove(filepath.Join(root, d))
			}
		}
	})
}

// TestTwoPodsOwnIdentities: two containers in different pods each get
// only their own SVID; the second's annotation can neither obtain the
// first's identity (spiffe_id) nor reach its files: each delivery is its
// own state subdirectory, mounted at the container's own cert_dir, and the
// first container's files are untouched by the second's delivery, refusal
// and poststop.
func TestTwoPodsOwnIdentities(t *testing.T) {
	podA, podB := fakePod{"pod-a", newUID()}, fakePod{"pod-b", newUID()}
	e := startEnvWith(t, k8sAttestor(startKubelet(t, podA, podB)))
	idA, idB := "spiffe://example.org/ns/default/pod/pod-a", "spiffe://example.org/ns/default/pod/pod-b"
	e.spire.CreateEntry(t, idA, []string{"k8s:pod-uid:" + podA.uid}, time.Hour)
	e.spire.CreateEntry(t, idB, []string{"k8s:pod-uid:" + podB.uid}, time.Hour)
	e.waitSynced()

	// A runs on, holding its identity.
	a := newBundle(t, []string{"/bin/sh", "-c", "sleep 60"})
	a.inPod(t, podA.uid)
	a.AddAnnotation(annotation, "- cert_dir: /certs\n")
	a.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	a.runDetached(t, "runc")
	aState := filepath.Join(e.stateDir, "containers", a.id)
	aFiles := snapshot(t, aState)
	if len(aFiles) == 0 {
		t.Fatalf("no state for container A")
	}
	certA := readFile(filepath.Join(aState, "0", "svid.pem"))
	checkSVID(t, certA, readFile(filepath.Join(aState, "0", "svid_key.pem")), readFile(filepath.Join(aState, "0", "svid_bundle.pem")), idA)

	mountRoot := func(t *testing.T, out string) string {
		t.Helper()
		f := strings.Fields(section(t, out, "mount"))
		if len(f) < 5 {
			t.Fatalf("mountinfo line %q", section(t, out, "mount"))
		}
		return f[3] // the mount's root within its filesystem (the state tmpfs)
	}

	t.Run("B gets its own identity and only its own files", func(t *testing.T) {
		b := newBundle(t, []string{"/bin/sh", "-c", printFiles("/certs") + "echo '=== ls ==='; ls -a /certs; echo '=== end ls ==='\n"})
		b.inPod(t, podB.uid)
		b.AddAnnotation(annotation, "- cert_dir: /certs\n")
		b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
		out, stderr, err := b.runc(t)
		if err != nil {
			t.Fatalf("runc run: %v: %s", err, stderr)
		}
		svid := checkSVID(t, section(t, out, "cert"), section(t, out, "key"), section(t, out, "bundle"), idB)
		if svid.Certificates[0].Equal(leafOf(t, certA)) {
			t.Error("B read A's certificate")
		}
		if got, want := mountRoot(t, out), "/containers/"+b.id+"/0"; got != want {
			t.Errorf("B's cert_dir is mounted from %s of the state directory, want %s", got, want)
		}
		if strings.Contains(out, a.id) {
			t.Errorf("B's view mentions A's container id:\n%s", out)
		}
		if code, msg := runBinary(t, hookBin, stoppedState(b), "--config", e.config); code != 0 {
			t.Fatalf("B's poststop: %d %s", code, msg)
		}
		for _, p := range e.listState() {
			if strings.Contains(p, b.id) {
				t.Errorf("state holds %s after B's poststop", p)
			}
		}
	})

	t.Run("B cannot ask for A's identity", func(t *testing.T) {
		b := newBundle(t, []string{"/bin/echo", "STARTED"})
		b.inPod(t, podB.uid)
		b.AddAnnotation(annotation, "- cert_dir: /certs\n  spiffe_id: "+idA+"\n")
		b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
		out, stderr, err := b.runc(t)
		if err == nil || strings.Contains(out, "STARTED") {
			t.Fatalf("B started asking for A's identity: %q", out)
		}
		if want := "spiffe_id " + idA + " is not among the identities the agent returned for this container (" + idB + ")"; !strings.Contains(stderr, want) {
			t.Errorf("runc's error lacks %q: %s", want, stderr)
		}
		for _, p := range e.listState() {
			if strings.Contains(p, b.id) {
				t.Errorf("state holds %s of the refused container", p)
			}
		}
	})

	t.Run("A is untouched", func(t *testing.T) {
		if d := diffSnapshots(aFiles, snapshot(t, aState)); len(d) > 0 {
			t.Errorf("A's state changed while B was delivered, refused and forgotten: %v", d)
		}
		out, err := exec.Command("runc", "--root", filepath.Join(a.dir, "runc-root"), "exec", a.id, "/bin/sh", "-c", printFiles("/certs")).Output()
		if err != nil {
			t.Fatalf("runc exec in A: %v: %s", err, out)
		}
		checkSVID(t, section(t, string(out), "cert"), section(t, string(out), "key"), section(t, string(out), "bundle"), idA)
		if got, want := mountRoot(t, string(out)), "/containers/"+a.id+"/0"; got != want {
			t.Errorf("A's cert_dir is mounted from %s, want %s", got, want)
		}
	})
}
