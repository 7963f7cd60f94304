package cri

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/test/criconf"
)

// containerd is a running containerd (test/containerd) with the project's
// NRI plugin registered on its NRI socket.
type containerd struct {
	*runtime
	conf, log string
	nriSocket string
	// hostRunContainerd: /run/containerd existed before the test.
	hostRunContainerd bool
	cmd               *exec.Cmd
	done              chan struct{}
	nri               *nriPlugin
}

// startContainerd starts containerd for node n with every directory under
// a temp dir (root, state, shim sockets, NRI socket, runc root, CNI, opt),
// runc under cgroupfs, restrict_oom_score_adj (no CAP_SYS_RESOURCE here),
// no CNI (host-network pods run), the busybox and pause images imported
// with ctr, the containerd-nri overlay's containerd-nri.toml imported
// (its paths under the temp dir), and spiffe-oci-nri injecting the
// installed hook.
func startContainerd(t *testing.T, n *node) *containerd {
	t.Helper()
	dir := tempDir(t, "cri-ctrd-")
	os.MkdirAll(filepath.Join(dir, "pods"), 0o755)
	overlay, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "kubernetes", "overlays", "containerd-nri", "containerd-nri.toml"))
	if err != nil {
		t.Fatal(err)
	}
	nriToml := filepath.Join(dir, "containerd-nri.toml")
	rooted := rootPaths(string(overlay), dir)
	if err := os.WriteFile(nriToml, []byte(rooted), 0o644); err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*socket_path\s*=\s*'([^']+)'`).FindStringSubmatch(rooted)
	if m == nil {
		t.Fatalf("containerd-nri.toml sets no NRI socket_path:\n%s", overlay)
	}
	socket := filepath.Join(dir, "containerd.sock")
	confPath, err := criconf.Containerd{
		Dir: dir, Socket: socket, Imports: []string{nriToml}, PauseImage: pauseImage,
		CNIBinDir: filepath.Join(dir, "cni", "bin"), CNIConfDir: filepath.Join(dir, "cni", "net.d"),
	}.Write()
	if err != nil {
		t.Fatal(err)
	}
	c := &containerd{conf: confPath, log: filepath.Join(dir, "containerd.log"), nriSocket: m[1]}
	_, err = os.Stat("/run/containerd")
	c.hostRunContainerd = err == nil
	hostPathsUntouched(t, "containerd")
	c.runtime = newRuntime(t, "containerd", n, dir, socket)
	c.start(t)
	t.Cleanup(func() {
		// Pods first (their poststop hooks), then the plugin, then
		// containerd; the shims left are the test binary's children.
		if out, err := c.run("rmp", "-fa"); err != nil {
			t.Errorf("crictl rmp -fa: %v %s", err, out)
		}
		n.checkStateEmpty(t)
		if c.nri != nil {
			c.nri.stop(t)
		}
		c.stop(t)
		if t.Failed() {
			t.Logf("containerd log:\n%s", tail(c.log, 60))
		}
	})

	archive := podmanSave(t, dir)
	ctr := exec.Command(filepath.Join(toolDir, "ctr"), "--address", socket, "-n", "k8s.io", "images", "import", archive)
	if out, err := ctr.CombinedOutput(); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	}
	c.nri = startNRI(t, c, n)
	return c
}

// start starts containerd (again) and waits until it answers.
func (c *containerd) start(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(c.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	c.cmd = exec.Command(filepath.Join(toolDir, "containerd"), "--config", c.conf)
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(c.cmd, c.done)
	c.waitReady(t, c.done, c.log)
}

// stop stops containerd with SIGTERM; containers and shims run on.
func (c *containerd) stop(t *testing.T) {
	t.Helper()
	if c.cmd == nil {
		return
	}
	if _, ok := stop(c.cmd, c.done, unix.SIGTERM, 30*time.Second); !ok {
		t.Errorf("containerd did not stop at SIGTERM")
	}
	c.cmd = nil
}

// nriPlugin is a running spiffe-oci-nri.
type nriPlugin struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

// startNRI starts spiffe-oci-nri on containerd's NRI socket, injecting the
// installed hook with the node's configuration, and waits until
// containerd has it registered.
func startNRI(t *testing.T, c *containerd, n *node) *nriPlugin {
	t.Helper()
	p := &nriPlugin{log: filepath.Join(c.dir, "nri.log")}
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	mark := fileSize(c.log)
	p.cmd = exec.Command(nriBin, "--nri-socket", c.nriSocket, "--hook-path", n.hookBin, "--hook-config", n.config)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.done = make(chan struct{})
	go func() { p.cmd.Wait(); close(p.done) }()
	c.waitRegistered(t, mark)
	return p
}

// stop stops the plugin with SIGTERM and reports how long it took.
func (p *nriPlugin) stop(t *testing.T) (time.Duration, bool) {
	t.Helper()
	select {
	case <-p.done:
		return 0, true
	default:
	}
	return stop(p.cmd, p.done, unix.SIGTERM, 10*time.Second)
}

// registered matches containerd's log line for a plugin that has
// finished registering.
// (logrus quotes the message, escaping its quotes).
var registered = regexp.MustCompile(`plugin \\?"10-spiffe-oci-hook\\?" connected and synchronized`)

// waitRegistered waits until containerd's log, after offset mark, says
// the plugin has registered.
func (c *containerd) waitRegistered(t *testing.T, mark int64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		data, _ := os.ReadFile(c.log)
		if int64(len(data)) > mark && registered.Match(data[mark:]) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd never registered spiffe-oci-nri; containerd log:\n%s\nplugin log:\n%s", tail(c.log, 30), tail(c.nriLog(), 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *containerd) nriLog() string { return filepath.Join(c.dir, "nri.log") }

func fileSize(p string) int64 {
	st, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return st.Size()
}

// rootPaths places every quoted absolute path of a configuration file
// (TOML, single or double quotes) under root.
func rootPaths(conf, root string) string {
	conf = strings.ReplaceAll(conf, `'/`, `'`+root+`/`)
	return strings.ReplaceAll(conf, `"/`, `"`+root+`/`)
}
