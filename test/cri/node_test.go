package cri

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

const (
	trustDomain = "example.org"
	hookID      = "spiffe://example.org/spiffe-oci-hook"
	refresherID = "spiffe://example.org/spiffe-oci-refresher"
	annotation  = "identity.noderesource.dev/container"
)

// node is what a Kubernetes node runs besides the container runtime: a
// SPIRE agent (and here its server) whose k8s workload attestor asks a
// stand-in kubelet, the hook and the refresher as `make install` installs
// them, and a tmpfs state directory.
type node struct {
	dir       string // everything of this node lives under it
	spire     *spiretest.SPIRE
	kubelet   *kubelet
	prefix    string // make install PREFIX: <dir>/usr
	hookBin   string // the installed hook, as the hooks.d JSON names it
	hooksDir  string // the installed hooks.d JSON's directory
	config    string // the installed node configuration
	stateDir  string
	refresher *exec.Cmd
	refLog    string
	entries   map[string]bool
	// expected are the containers a test makes run without their
	// identity on purpose (checkAudit).
	expected sync.Map
	api      string // the node's agent_api
	// shortLived: the node's annotated containers live shorter than the
	// audit's interval (the pod-start and hook-floor benchmarks), so the
	// audit may never see one running; checkAudit still checks that it
	// reported none falsely.
	shortLived bool
	// atDefaults: the refresher runs with its default intervals (retry
	// backoff, rescans and audits every 30 s), as make install leaves it,
	// instead of the short ones that let tests see its work at once
	// (TestBenchNode measures its CPU).
	atDefaults bool
}

// newNode starts SPIRE (k8s attestor with pod-level selectors, as at
// createRuntime), the stand-in kubelet, installs the hook and the
// refresher under dir with make install, and starts the refresher.
func newNode(t *testing.T, dir string) *node {
	t.Helper()
	return newNodeAPI(t, dir, config.APIDelegated)
}

// newNodeAPI is newNode with the hook and the refresher speaking api. With
// the Broker API the agent has no admin socket at all; its broker endpoint
// and its k8s attestor admit the refresher (and the harness, which waits
// for entries through it).
func newNodeAPI(t *testing.T, dir, api string) *node {
	t.Helper()
	n := &node{dir: dir, kubelet: startKubelet(t), entries: map[string]bool{}, api: api}
	n.prefix = filepath.Join(dir, "usr")
	n.stateDir = filepath.Join(dir, "state")
	testhelp.MountTmpfs(t, n.stateDir, "mode=0700,size=64m")

	opts := spiretest.Options{
		TrustDomain:         trustDomain,
		AuthorizedDelegates: []string{hookID, refresherID},
	}
	k8sBroker := ""
	if api == config.APIBroker {
		opts.Broker, opts.NoAdminSocket, opts.Brokers = true, true, []string{refresherID}
		// SPIRE 1.15's k8s attestor answers Broker API references only
		// for brokers it lists itself.
		k8sBroker = fmt.Sprintf(`
            experimental {
                broker {
                    access_policy = "permissive"
                    brokers = [{ id = %q }, { id = %q }]
                }
            }`, refresherID, "spiffe://"+trustDomain+spiretest.HarnessPath)
	}
	opts.ExtraAgentPlugins = fmt.Sprintf(`    WorkloadAttestor "k8s" {
        plugin_data {
            kubelet_read_only_port = %d
            disable_container_selectors = true
            node_name = "node"%s
        }
    }`, n.kubelet.port, k8sBroker)
	n.spire = spiretest.Start(t, opts)

	// The node configuration goes where make install's SYSCONFDIR puts it
	// before install runs: install keeps an existing one, as an admin's.
	sysconf := filepath.Join(dir, "etc")
	n.config = filepath.Join(sysconf, "spiffe-oci-hook", "config.yaml")
	os.MkdirAll(filepath.Dir(n.config), 0o755)
	// The refresher audits the runtime roots and CRI sockets of this
	// package's runtimes (CRI-O's runtime_root, containerd's runc Root per
	// namespace), every second.
	cfg := fmt.Sprintf("agent_admin_socket: %s\nstate_dir: %s\ntimeout: 10s\n%s", n.spire.AdminSocket, n.stateDir, auditConfig)
	if api == config.APIBroker {
		cfg = fmt.Sprintf("agent_api: broker\nbroker_socket: %s\nworkload_api_socket: %s\nbroker_spiffe_id: %s\nstate_dir: %s\ntimeout: 10s\n%s",
			n.spire.BrokerSocket, n.spire.WorkloadSocket, refresherID, n.stateDir, auditConfig)
	}
	if err := os.WriteFile(n.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	// Installed under dir, in the layout of the Kubernetes DaemonSet (the
	// hook under /opt); CRI-O finds the JSON's directory at its default
	// hooks directory (startCRIO).
	// Install variables, not DESTDIR: the JSON then names the hook and its
	// --config where they really are, and the runtime can run it.
	n.hookBin = filepath.Join(dir, "opt", "spiffe-oci-hook", "bin", "spiffe-oci-hook")
	n.hooksDir = filepath.Join(sysconf, "containers", "oci", "hooks.d")
	install := exec.Command("make", "-C", repoRoot, "install", "PREFIX="+n.prefix, "SYSCONFDIR="+sysconf,
		"HOOK_DIR="+filepath.Dir(n.hookBin), "HOOKS_JSON_DIR="+n.hooksDir)
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	refresherBin := filepath.Join(n.prefix, "bin", "spiffe-oci-refresher")

	// The delegate is spiffe-oci-hook-direct, which the hook runs when no
	// refresher takes the container over.
	n.spire.CreateEntry(t, hookID, []string{"unix:uid:0", "unix:path:" + filepath.Join(filepath.Dir(n.hookBin), "spiffe-oci-hook-direct")}, time.Hour)
	n.spire.CreateEntry(t, refresherID, []string{"unix:uid:0", "unix:path:" + refresherBin}, time.Hour)
	n.startRefresher(t, refresherBin)
	if api == config.APIBroker {
		// The hook presents the broker SVID the refresher writes once the
		// Workload API has given it one; until then it refuses containers.
		deadline := time.Now().Add(30 * time.Second)
		for {
			id, err := brokersvid.Load(brokersvid.Dir(n.stateDir), time.Now())
			if err == nil && id.SVID.ID.String() == refresherID {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no broker SVID for %s after 30 s (%v); refresher log:\n%s", refresherID, err, tail(n.refLog, 40))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return n
}

// restartRefresher stops the refresher (SIGTERM) and starts it again, for
// a change of its flags (atDefaults).
func (n *node) restartRefresher(t *testing.T) {
	t.Helper()
	n.refresher.Process.Signal(unix.SIGTERM)
	n.refresher.Wait()
	os.Remove(filepath.Join(n.dir, "notify.sock"))
	n.startRefresher(t, filepath.Join(n.prefix, "bin", "spiffe-oci-refresher"))
}

// startRefresher runs the installed refresher and waits for its systemd
// readiness notification (Type=notify).
func (n *node) startRefresher(t *testing.T, bin string) {
	t.Helper()
	notify := filepath.Join(n.dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	n.refLog = filepath.Join(n.dir, "refresher.log")
	logf, err := os.Create(n.refLog)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	args := []string{"--config", n.config}
	if !n.atDefaults {
		// The node configuration's audit interval is 1 s (auditConfig).
		args = append(args, "--backoff-min", "200ms", "--backoff-max", "2s", "--rescan-interval", "2s")
	} else {
		args = append(args, "--audit-interval", config.Default().Refresher.Audit.Interval.String())
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	n.refresher = cmd
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		cmd.Wait()
		n.checkAudit(t)
		if t.Failed() {
			t.Logf("refresher log:\n%s", tail(n.refLog, 40))
		}
	})
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 256)
	m, _, err := conn.ReadFromUnix(buf)
	if err != nil || !strings.Contains(string(buf[:m]), "READY=1") {
		t.Fatalf("no READY=1 from the refresher (%v, %q); log:\n%s", err, buf[:m], tail(n.refLog, 40))
	}
}

// workloadID is the identity of a pod's service account in a namespace.
func workloadID(ns, sa string) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, ns, sa)
}

// register creates the entry for a namespace and service account (once),
// with pod-level selectors, and waits until the agent has it.
func (n *node) register(t *testing.T, ns, sa string, ttl time.Duration) string {
	t.Helper()
	id := workloadID(ns, sa)
	if n.entries[id] {
		return id
	}
	n.spire.CreateEntry(t, id, []string{"k8s:ns:" + ns, "k8s:sa:" + sa}, ttl)
	n.entries[id] = true
	n.waitSynced(t)
	return id
}

// waitSynced blocks until every entry created so far has reached the
// agent: a sentinel entry for a process of its own uid, created last,
// being served means the earlier ones are too.
func (n *node) waitSynced(t *testing.T) {
	t.Helper()
	const sentinelUID = 4243
	n.spire.WaitSynced(t, sentinelUID)
}

// statePaths lists every path under the state directory that names one of
// ids (all paths when ids is empty).
func (n *node) statePaths(ids ...string) []string {
	var paths []string
	filepath.Walk(n.stateDir, func(p string, _ os.FileInfo, _ error) error {
		rel := strings.TrimPrefix(p, n.stateDir)
		if rel == "" {
			return nil
		}
		if len(ids) == 0 || slices.ContainsFunc(ids, func(id string) bool { return strings.Contains(rel, id) }) {
			paths = append(paths, rel)
		}
		return nil
	})
	return paths
}

// waitStateGone waits until nothing in the state directory names one of
// ids, and fails with what is left.
func (n *node) waitStateGone(t *testing.T, why string, ids ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		left := n.statePaths(ids...)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the state directory still holds %v", why, left)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkStateEmpty fails the test unless, once every pod is gone, the
// state directory holds no file, symlink or per-container directory
// (only the top-level directories and the refresher's status socket).
func (n *node) checkStateEmpty(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var left []string
		filepath.Walk(n.stateDir, func(p string, fi os.FileInfo, err error) error {
			if err != nil || p == n.stateDir {
				return nil
			}
			rel := strings.TrimPrefix(p, n.stateDir+"/")
			if (fi.Mode().Type() == os.ModeSocket || rel == "refresher.alive") && !strings.Contains(rel, "/") {
				return nil // the refresher's own status socket and heartbeat
			}
			if rel == "broker" && fi.IsDir() {
				return filepath.SkipDir // the node's broker SVID (agent_api broker)
			}
			if !fi.IsDir() || strings.Contains(rel, "/") {
				left = append(left, rel)
			}
			return nil
		})
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("with every pod removed, the state directory still holds %v", left)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// kubelet is a stand-in for the kubelet's read-only port: it serves
// /pods, the pods the test has created, for SPIRE's k8s attestor.
type kubelet struct {
	port int
	mu   sync.Mutex
	pods []map[string]any
}

func startKubelet(t *testing.T) *kubelet {
	t.Helper()
	k := &kubelet{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/pods" {
			http.NotFound(w, r)
			return
		}
		k.mu.Lock()
		body, _ := json.Marshal(map[string]any{"kind": "PodList", "apiVersion": "v1", "items": k.pods})
		k.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })
	k.port = lis.Addr().(*net.TCPAddr).Port
	return k
}

// add makes the kubelet know the pod, as the API server's pod reaches it
// before the kubelet asks the runtime for a sandbox.
func (k *kubelet) add(p *pod) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.pods = append(k.pods, map[string]any{
		"metadata": map[string]any{"name": p.name, "namespace": p.ns, "uid": p.uid, "annotations": p.annotations},
		"spec":     map[string]any{"serviceAccountName": p.sa, "nodeName": "node"},
		"status":   map[string]any{"phase": "Pending"},
	})
}

// hostMounts returns the host's mount points whose path or source names
// one of words.
func hostMounts(words ...string) []string { return mountsIn("/proc/self/mountinfo", words...) }

// mounts returns the mount points of the runtime's mount namespace whose
// path or source names one of words.
func (r *runtime) mounts(words ...string) []string { return mountsIn(r.mountinfo, words...) }

// mountsIn returns the lines of a mountinfo file that name one of words.
func mountsIn(mountinfo string, words ...string) []string {
	f, err := os.Open(mountinfo)
	if err != nil {
		return nil
	}
	defer f.Close()
	var hits []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		for _, w := range words {
			if strings.Contains(sc.Text(), w) {
				hits = append(hits, sc.Text())
				break
			}
		}
	}
	return hits
}

// mountsUnder lists mount points under dir, deepest first.
func mountsUnder(dir string) []string {
	var ms []string
	for _, line := range hostMounts(dir) {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			ms = append(ms, f[4])
		}
	}
	slices.Reverse(ms)
	return ms
}

func tail(path string, n int) string {
	data, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// hostDefaults are where CRI-O, containerd and NRI keep things unless
// told otherwise; the tests tell them otherwise.
var hostDefaults = []string{
	"/etc/crio", "/var/lib/crio", "/run/crio", "/var/log/crio",
	"/etc/containerd", "/var/lib/containerd", "/run/containerd", "/opt/containerd",
	"/run/nri", "/var/run/nri", "/opt/nri", "/etc/nri", "/etc/cdi", "/var/run/cdi",
	"/etc/containers/oci/hooks.d", "/usr/share/containers/oci/hooks.d",
	"/opt/spiffe-oci-hook", "/etc/spiffe-oci-hook",
}

// hostPathsUntouched fails the test if a runtime started now creates one
// of its default paths on the host (checked when the test ends, after the
// runtime has stopped).
func hostPathsUntouched(t *testing.T, runtime string) {
	t.Helper()
	var absent []string
	for _, p := range hostDefaults {
		if _, err := os.Lstat(p); err != nil {
			absent = append(absent, p)
		}
	}
	t.Cleanup(func() {
		for _, p := range absent {
			if _, err := os.Lstat(p); err == nil {
				t.Errorf("%s created %s on the host", runtime, p)
			}
		}
	})
}
