package refresh

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/render"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// The fake node the refresher's tests run on, and what they share to
// drive it and read what it wrote.

var workload = spiffeid.RequireFromString("spiffe://example.org/workload")

// node is a fake node: a fake agent, a tmpfs state directory and helpers
// that play the hook's part.
type node struct {
	t      *testing.T
	dir    string
	socket string
	agent  *fakeagent.Agent
	cfg    config.Config
	store  statedir.Store
	logs   *testhelp.SyncBuffer
}

func newNode(t *testing.T) *node {
	t.Helper()
	dir, state := testhelp.TempNode(t, "needs root: the state directory must be a tmpfs mount", "refresh-", "size=256m")
	n := &node{t: t, dir: dir, socket: filepath.Join(dir, "admin.sock"), logs: &testhelp.SyncBuffer{}}
	n.agent = fakeagent.Start(t, "example.org", n.socket)
	n.agent.Default = []spiffeid.ID{workload}
	n.cfg = config.Default()
	n.cfg.AgentAdminSocket = n.socket
	n.cfg.StateDir = state
	n.cfg.Refresher.BackoffMin = 50 * time.Millisecond
	n.cfg.Refresher.BackoffMax = 500 * time.Millisecond
	n.cfg.Refresher.RescanInterval = time.Second
	n.store = statedir.Store{Dir: state}
	if err := n.store.Init(); err != nil {
		t.Fatal(err)
	}
	return n
}

// deliver does what the hook does for a process: fetch, write, record.
func (n *node) deliver(pid int) string {
	n.t.Helper()
	return n.deliverAs(pid, true)
}

// deliverWhileServing is deliver for a node whose refresher runs: it does
// not wait for the agent's stream count to drop, which the refresher's own
// new streams keep from happening.
func (n *node) deliverWhileServing(pid int) string {
	n.t.Helper()
	return n.deliverAs(pid, false)
}

// classic is the delivery deliver writes: the three files at their defaults.
var classic = annotations.Delivery{CertDir: "/certs", SVIDFileName: "svid.pem", KeyFileName: "svid_key.pem", BundleFileName: "svid_bundle.pem"}

func (n *node) deliverAs(pid int, waitStreams bool) string {
	n.t.Helper()
	return n.deliverDelivery(pid, waitStreams, classic)
}

// deliverDelivery is deliverAs for one delivery of the caller's choosing.
func (n *node) deliverDelivery(pid int, waitStreams bool, ad annotations.Delivery) string {
	n.t.Helper()
	return n.deliverInstance(fmt.Sprintf("c%d", pid), pid, waitStreams, ad)
}

// deliverInstance is deliverDelivery under a container ID of the caller's
// choosing, which may name an earlier instance (a restarted container).
func (n *node) deliverInstance(id string, pid int, waitStreams bool, ad annotations.Delivery) string {
	n.t.Helper()
	proc, err := process.Open(pid)
	if err != nil {
		n.t.Fatal(err)
	}
	defer proc.Close()
	client, err := agent.New(n.socket)
	if err != nil {
		n.t.Fatal(err)
	}
	defer client.Close()
	streams := n.agent.SVIDStreams()
	update, bundles, err := client.FetchX509(context.Background(), pid, agent.Wait{})
	if err != nil {
		n.t.Fatal(err)
	}
	// The fetch's streams close asynchronously on the server side.
	if waitStreams {
		testhelp.Eventually(n.t, 5*time.Second, "fetch streams closed", func() bool { return n.agent.SVIDStreams() <= streams })
	}
	in := render.Input{SVID: update.SVIDs[0], Bundles: bundles, FederatesWith: update.FederatesWith}
	if auds, jwtBundles := annotations.JWTRequests([]annotations.Delivery{ad}); len(auds) > 0 || jwtBundles {
		if in.JWT, err = client.FetchJWT(context.Background(), pid, agent.JWTRequest{Audiences: auds, Bundles: jwtBundles}); err != nil {
			n.t.Fatal(err)
		}
		in.JWTBundles = in.JWT.Bundles
	}
	d := statedir.Delivery{Delivery: ad, Delivered: update.SVIDs[0].ID.String()}
	fs, err := render.Delivery(ad, in)
	if err != nil {
		n.t.Fatal(err)
	}
	os.MkdirAll(n.store.ContainerDir(id), 0o700)
	if err := (files.Writer{}).Write(n.store.DeliveryDir(id, 0), fs, files.Owner{UID: 1000, GID: 1000}); err != nil {
		n.t.Fatal(err)
	}
	rec := statedir.Record{ID: id, PID: pid, StartTime: proc.StartTime, AgentSocket: n.socket, Owner: files.Owner{UID: 1000, GID: 1000}, Deliveries: []statedir.Delivery{d}}
	if err := n.store.Save(rec); err != nil {
		n.t.Fatal(err)
	}
	return id
}

// workloadProcess starts a process standing in for a container.
func (n *node) workloadProcess() *exec.Cmd {
	n.t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// start runs a refresher until the returned stop is called.
func (n *node) start(configure ...func(*Refresher)) (*Refresher, func()) {
	n.t.Helper()
	r := New(n.cfg, slog.New(slog.NewTextHandler(n.logs, &slog.HandlerOptions{Level: slog.LevelInfo})))
	for _, f := range configure {
		f(r)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		n.t.Fatalf("refresher stopped: %v", err)
	case <-time.After(10 * time.Second):
		n.t.Fatal("refresher not ready after 10 s")
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				n.t.Errorf("refresher: %v", err)
			}
		})
	}
	n.t.Cleanup(stop)
	return r, stop
}

func (n *node) cert(id string) []byte {
	n.t.Helper()
	fs, err := files.Read(n.store.DeliveryDir(id, 0), "svid.pem")
	if err != nil {
		n.t.Fatal(err)
	}
	return fs["svid.pem"]
}

// startServing is start, then a wait until the refresher serves the one
// container delivered.
func (n *node) startServing() (*Refresher, func()) {
	n.t.Helper()
	r, stop := n.start()
	testhelp.Eventually(n.t, 5*time.Second, "container served", func() bool { return r.Count() == 1 })
	return r, stop
}

// federate has the agent federate with td (again: a rotation of td's CA)
// and returns td's new CA.
func (n *node) federate(td string) *x509.Certificate {
	n.t.Helper()
	ca, err := n.agent.Federate(td)
	if err != nil {
		n.t.Fatal(err)
	}
	return ca
}

// checkOutageLoggedOnce checks that the refresher logged an agent outage
// and the recovery from it once each, and returns the log.
func (n *node) checkOutageLoggedOnce() string {
	n.t.Helper()
	logs := n.logs.String()
	if c := strings.Count(logs, "agent unreachable"); c != 1 {
		n.t.Errorf("outage logged %d times, want once:\n%s", c, logs)
	}
	if c := strings.Count(logs, "agent reachable again"); c != 1 {
		n.t.Errorf("recovery logged %d times, want once:\n%s", c, logs)
	}
	return logs
}

// readUntil calls read over and over on a goroutine of wg until stop is
// closed: a reader racing the refresher's writes.
func readUntil(wg *sync.WaitGroup, stop <-chan struct{}, read func()) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			read()
		}
	}()
}

// naiveTwoFileRead reads svid.pem then svid_key.pem by their plain names,
// as an application that ignores "..data" would, and reports whether the
// two belong together: a rotation between the reads tears the pair.
func naiveTwoFileRead(dir string) bool {
	cert, err1 := os.ReadFile(filepath.Join(dir, "svid.pem"))
	key, err2 := os.ReadFile(filepath.Join(dir, "svid_key.pem"))
	if err1 != nil || err2 != nil {
		return false
	}
	_, err := x509svid.Parse(cert, key)
	return err == nil
}
