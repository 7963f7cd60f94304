package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
)

// TestBrokerAPI runs the hook and the refresher with agent_api broker
// against SPIRE 1.15.3 whose agent serves the SPIFFE Broker API
// (experimental.broker, PID references, the refresher's SPIFFE ID in
// brokers) and has no admin socket configured at all:
//
//   - hook delivery of the X.509 SVID and bundle (TestRuncDeliversSVID)
//     and of the JWT-SVID and JWT bundle (TestJWTDelivery), read by the
//     container's own process, so before it started;
//   - rotation with a 30 s TTL, the agent killed and restarted, the
//     refresher killed and restarted (TestRefresherLifecycle);
//   - the broker SVID the refresher keeps for the hook;
//   - a broker SVID whose ID the agent does not list;
//   - a pid without entry.
func TestBrokerAPI(t *testing.T) {
	runAgainst(t, spiretest.V115, config.APIBroker, slices.Concat(compatSubset, []namedTest{
		{"RefresherKeepsBrokerSVID", testBrokerRefresherSVID},
		{"BrokerNotListed", testBrokerNotListed},
		{"NoEntry", testBrokerNoEntry},
	}))
}

// waitBrokerSVID waits until the state directory's broker SVID is id's.
func (e *env) waitBrokerSVID(t *testing.T, id string, r *refresher) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := brokersvid.Load(brokersvid.Dir(e.stateDir), time.Now())
		if err == nil && got.SVID.ID.String() == id {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the broker SVID is not %s after 30 s (%v); refresher log:\n%s", id, err, readFile(r.log))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// testBrokerRefresherSVID: the refresher writes its own SVID from the
// Workload API into the state directory, root's only, and the hook
// delivers with it.
func testBrokerRefresherSVID(t *testing.T) {
	e := newEnv(t)
	r := e.startRefresher(t)
	e.waitBrokerSVID(t, refresherID, r)
	st, err := os.Stat(filepath.Join(brokersvid.Dir(e.stateDir), brokersvid.KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("broker SVID key mode %o, want 600", st.Mode().Perm())
	}
	b := newBundle(t, []string{"/bin/sh", "-c", printFiles("/certs")})
	b.AddAnnotation(annotation, "- cert_dir: /certs\n")
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	out, stderr, err := b.runc(t)
	if err != nil {
		t.Fatalf("runc run: %v\nstderr: %s", err, stderr)
	}
	checkSVID(t, section(t, out, "cert"), section(t, out, "key"), section(t, out, "bundle"), workloadID)
}

// testBrokerNotListed: a refresher whose SVID the agent's brokers do not
// list writes it; the hook's line names that ID and the agent setting,
// and the container does not start.
func testBrokerNotListed(t *testing.T) {
	e := newEnv(t)
	const notBroker = "spiffe://example.org/not-a-broker"
	other := filepath.Join(shortTempDir(t), "spiffe-oci-refresher")
	data, err := os.ReadFile(refresherBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(other, data, 0o755); err != nil {
		t.Fatal(err)
	}
	e.spire.CreateEntry(t, notBroker, []string{"unix:uid:0", "unix:path:" + other}, time.Hour)
	e.waitSynced()
	cfg := filepath.Join(e.dir, "not-a-broker.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("agent_api: broker\nbroker_socket: %s\nworkload_api_socket: %s\nbroker_spiffe_id: %s\nstate_dir: %s\ntimeout: 10s\n",
		e.spire.BrokerSocket, e.spire.WorkloadSocket, notBroker, e.stateDir)), 0o600)
	r := e.startRefresherBin(t, other, cfg)
	e.waitBrokerSVID(t, notBroker, r)

	b := newBundle(t, []string{"/bin/echo", "STARTED"})
	b.AddAnnotation(annotation, "- cert_dir: /certs\n")
	b.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(cfg)}}
	out, stderr, err := b.runc(t)
	if err == nil || strings.Contains(out, "STARTED") {
		t.Fatalf("the container started: out %q", out)
	}
	for _, w := range []string{"refused this broker's X.509-SVID " + notBroker, "experimental.broker.brokers[].id"} {
		if !strings.Contains(stderr, w) {
			t.Errorf("runc's error lacks %q: %s", w, stderr)
		}
	}
	if got := e.listState(); !clean(got) {
		t.Errorf("state directory holds %v", got)
	}
}

// testBrokerNoEntry: a pid no entry matches. SPIRE 1.15.3 answers with
// an update without SVID (the specification: WORKLOAD_NOT_ENTITLED); the
// hook says so in one line, and the container does not start.
func testBrokerNoEntry(t *testing.T) {
	e := startEnv(t)
	e.waitSynced()
	nobody := startAs(t, 65534)
	b := newBundle(t, []string{"/bin/true"})
	code, stderr := e.runHook(t, b, e.config, nobody, "- cert_dir: /certs\n")
	if code != 1 {
		t.Errorf("exit code %d, want 1 (stderr %q)", code, stderr)
	}
	if lines := strings.Split(strings.TrimSpace(stderr), "\n"); len(lines) != 1 {
		t.Errorf("want one line, got %d: %q", len(lines), stderr)
	}
	for _, w := range []string{"container " + b.id + ":", "no registration entry matches", fmt.Sprint(nobody), e.spire.BrokerSocket} {
		if !strings.Contains(stderr, w) {
			t.Errorf("line lacks %q: %q", w, stderr)
		}
	}

	// Under runc: runc init (uid 0, the runc binary) has no entry here.
	c := newBundle(t, []string{"/bin/echo", "STARTED"})
	c.AddAnnotation(annotation, "- cert_dir: /certs\n")
	c.Config.Hooks = &rspec.Hooks{CreateRuntime: []rspec.Hook{e.hook(e.config)}}
	out, rstderr, err := c.runc(t)
	if err == nil || strings.Contains(out, "STARTED") {
		t.Fatalf("the container started without its identity: out %q", out)
	}
	if !strings.Contains(rstderr, "no registration entry matches") {
		t.Errorf("runc's error does not carry the hook's line: %s", rstderr)
	}
	if got := e.listState(); !clean(got) {
		t.Errorf("state directory holds %v", got)
	}
}
