package hook

import (
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

var nodeBroker = spiffeid.RequireFromString("spiffe://example.org/node/refresher")

// fakeNode is a tmpfs state directory, a fake agent serving both APIs, a
// bundle directory and a process standing in for "runc init".
type fakeNode struct {
	cfg    config.Config
	fake   *fakeagent.Agent
	req    *Request
	broker string // the Broker API socket
}

func newFakeNode(t *testing.T) *fakeNode {
	t.Helper()
	dir, _, fake, cfg := agentNode(t, 16)
	n := &fakeNode{fake: fake, cfg: cfg, broker: filepath.Join(dir, "b.sock")}
	n.cfg.BrokerSocket = n.broker
	b, err := n.fake.ServeBroker(n.broker, nodeBroker)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Stop)

	bundle := writeBundle(dir, specs.Spec{Root: &specs.Root{Path: "rootfs"}, Process: &specs.Process{User: specs.User{UID: 1000, GID: 1000}}})
	pid := testhelp.StandIn(t)
	n.fake.Set(pid, spiffeid.RequireFromString("spiffe://example.org/web"))

	n.req, err = Find(&specs.State{ID: "c1", Pid: pid, Bundle: bundle, Annotations: map[string]string{
		annotations.Key: "- cert_dir: /certs\n  jwt_svids: [{jwt_audience: db, jwt_svid_file_name: db.token}]\n  jwt_bundle_file_name: jwt_bundle.json\n",
	}})
	if err != nil || n.req == nil {
		t.Fatalf("Find: %v %v", n.req, err)
	}
	return n
}

// writeBrokerSVID plays the refresher's part: the broker SVID in the
// state directory, minted with ttl.
func (n *fakeNode) writeBrokerSVID(t *testing.T, ttl time.Duration) {
	t.Helper()
	var old time.Duration
	n.fake.Configure(func(a *fakeagent.Agent) { old, a.TTL = a.TTL, ttl })
	svid, err := n.fake.MintSVID(nodeBroker)
	n.fake.Configure(func(a *fakeagent.Agent) { a.TTL = old })
	if err != nil {
		t.Fatal(err)
	}
	id := &brokersvid.Identity{SVID: svid, Bundle: x509bundle.FromX509Authorities(n.fake.TrustDomain, []*x509.Certificate{n.fake.CA()})}
	if err := brokersvid.Write(files.Writer{}, brokersvid.Dir(n.cfg.StateDir), id); err != nil {
		t.Fatal(err)
	}
}

// nothingDelivered checks that a failed Create left no record behind.
func (n *fakeNode) nothingDelivered(t *testing.T) {
	t.Helper()
	if _, err := (statedir.Store{Dir: n.cfg.StateDir}).Load("c1"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a record exists after a failed delivery (%v)", err)
	}
}

// TestBrokerCreate: with agent_api broker the hook presents the broker
// SVID from the state directory and delivers the SVID, bundle, JWT-SVID
// and JWT bundle, without a bundle stream of its own.
func TestBrokerCreate(t *testing.T) {
	n := newFakeNode(t)
	n.cfg.AgentAPI = config.APIBroker
	n.writeBrokerSVID(t, time.Hour)
	h := directHook(n.cfg)
	if err := h.Create(context.Background(), n.req); err != nil {
		t.Fatal(err)
	}
	rec, err := statedir.Store{Dir: n.cfg.StateDir}.Load("c1")
	if err != nil {
		t.Fatal(err)
	}
	if rec.AgentSocket != n.broker || rec.Deliveries[0].Delivered != "spiffe://example.org/web" {
		t.Fatalf("record names agent %s, identity %s", rec.AgentSocket, rec.Deliveries[0].Delivered)
	}
	fs, err := files.Read(statedir.Store{Dir: n.cfg.StateDir}.DeliveryDir("c1", 0), "svid.pem", "svid_key.pem", "svid_bundle.pem", "db.token", "jwt_bundle.json")
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range fs {
		if len(data) == 0 {
			t.Errorf("%s is empty", name)
		}
	}
	if n.fake.BundleStreams() != 0 {
		t.Errorf("%d X.509 bundle streams open", n.fake.BundleStreams())
	}
}

// TestBrokerSVIDMissing: without the broker SVID the hook refuses with
// one line that says who writes it; nothing is delivered.
func TestBrokerSVIDMissing(t *testing.T) {
	n := newFakeNode(t)
	n.cfg.AgentAPI = config.APIBroker
	h := directHook(n.cfg)
	err := h.Create(context.Background(), n.req)
	if !errors.Is(err, brokersvid.ErrMissing) {
		t.Fatalf("error = %v, want ErrMissing", err)
	}
	for _, w := range []string{brokersvid.Dir(n.cfg.StateDir), "spiffe-oci-refresher", "workload_api_socket"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not contain %q", err, w)
		}
	}
	n.nothingDelivered(t)
}

// TestBrokerSVIDExpired: an expired broker SVID (the refresher stopped)
// is refused by the hook itself, with its expiry, before any call.
func TestBrokerSVIDExpired(t *testing.T) {
	n := newFakeNode(t)
	n.cfg.AgentAPI = config.APIBroker
	n.writeBrokerSVID(t, -30*time.Second)
	h := directHook(n.cfg)
	err := h.Create(context.Background(), n.req)
	if !errors.Is(err, brokersvid.ErrMissing) || !strings.Contains(err.Error(), "expired at") || !strings.Contains(err.Error(), nodeBroker.String()) {
		t.Fatalf("error = %v, want the expired broker SVID named", err)
	}
	if n.fake.SVIDCalls() != 0 {
		t.Errorf("the hook called the agent %d times with an expired SVID", n.fake.SVIDCalls())
	}
	n.nothingDelivered(t)
}

// TestAttestationFailedLine: the Delegated Identity API of SPIRE 1.15.2+
// answers a pid it could not attest with Unavailable; the hook's line says
// that, not that the agent is down, and nothing is delivered.
func TestAttestationFailedLine(t *testing.T) {
	n := newFakeNode(t)
	n.fake.Configure(func(a *fakeagent.Agent) {
		a.RefuseSVIDs = status.Error(codes.Unavailable, "workload attestation failed")
	})
	// Retried within registration_wait while the process lives.
	n.cfg.RegistrationWait = 300 * time.Millisecond
	h := directHook(n.cfg)
	err := h.Create(context.Background(), n.req)
	if !errors.Is(err, agent.ErrAttestationFailed) || errors.Is(err, agent.ErrUnavailable) {
		t.Fatalf("error = %v, want ErrAttestationFailed", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "could not attest pid "+strconv.Itoa(n.req.State.Pid)) || !strings.Contains(msg, "retried for") || strings.Contains(msg, "is the SPIRE agent running") {
		t.Fatalf("line %q", msg)
	}
	n.nothingDelivered(t)
}

// TestCreateWaitsForEntry: a new pod's entry reaches the agent seconds
// after its container exists. The hook keeps the stream open through the
// agent's empty answer and delivers once the SVID follows, JWT-SVIDs
// included, with either API.
func TestCreateWaitsForEntry(t *testing.T) {
	for _, api := range []string{config.APIDelegated, config.APIBroker} {
		t.Run(api, func(t *testing.T) {
			n := newFakeNode(t)
			n.cfg.AgentAPI = api
			n.writeBrokerSVID(t, time.Hour)
			n.cfg.RegistrationWait = 10 * time.Second
			pid := n.req.State.Pid
			web := spiffeid.RequireFromString("spiffe://example.org/ns/new/sa/web")
			n.fake.Set(pid) // no entry yet
			go func() {
				time.Sleep(500 * time.Millisecond)
				n.fake.Set(pid, web)
			}()
			h := directHook(n.cfg)
			if err := h.Create(context.Background(), n.req); err != nil {
				t.Fatal(err)
			}
			rec, err := statedir.Store{Dir: n.cfg.StateDir}.Load("c1")
			if err != nil || rec.Deliveries[0].Delivered != web.String() {
				t.Fatalf("record %+v, %v: want %s delivered", rec, err, web)
			}
			token, err := os.ReadFile(filepath.Join(statedir.Store{Dir: n.cfg.StateDir}.DeliveryDir("c1", 0), "db.token"))
			if err != nil || len(token) == 0 {
				t.Fatalf("JWT-SVID not delivered after the wait: %v", err)
			}
		})
	}
}

// TestCreateWaitRunsOut: a pid no entry ever matches is refused once
// registration_wait has passed, with a line that says so, and nothing is
// left behind.
func TestCreateWaitRunsOut(t *testing.T) {
	n := newFakeNode(t)
	n.cfg.RegistrationWait = 400 * time.Millisecond
	n.fake.Set(n.req.State.Pid)
	h := directHook(n.cfg)
	err := h.Create(context.Background(), n.req)
	if !errors.Is(err, agent.ErrNoIdentity) {
		t.Fatalf("error = %v, want ErrNoIdentity", err)
	}
	for _, want := range []string{"waited 400ms for a registration entry", "ClusterSPIFFEID", "pid " + strconv.Itoa(n.req.State.Pid)} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("line %q lacks %q", err, want)
		}
	}
	n.nothingDelivered(t)
}
