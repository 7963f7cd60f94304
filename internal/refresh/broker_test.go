package refresh

import (
	"bytes"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// TestBrokerAPI: with agent_api broker the refresher fetches its own SVID
// from the Workload API, writes it for the hook, follows its rotation, and
// serves containers over the Broker API with it (mutual TLS: the fake
// endpoint admits only that ID).
func TestBrokerAPI(t *testing.T) {
	t.Parallel()
	n := newNode(t)
	me := spiffeid.RequireFromString("spiffe://example.org/node/refresher")
	brokerSocket := filepath.Join(n.dir, "broker.sock")
	b, err := n.agent.ServeBroker(brokerSocket, me)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Stop)
	w, err := n.agent.ServeWorkloadAPI(filepath.Join(n.dir, "api.sock"), me)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Stop)
	n.cfg.AgentAPI = config.APIBroker
	n.cfg.BrokerSocket = brokerSocket
	n.cfg.WorkloadAPISocket = filepath.Join(n.dir, "api.sock")

	// The hook's delivery, recorded as made over the Broker API.
	id := n.deliver(n.workloadProcess().Process.Pid)
	rec, err := n.store.Load(id)
	if err != nil {
		t.Fatal(err)
	}
	rec.AgentSocket = brokerSocket
	if err := n.store.Save(rec); err != nil {
		t.Fatal(err)
	}
	hooks := n.validCert(id)

	r, _ := n.start()
	dir := brokersvid.Dir(n.cfg.StateDir)
	var first []byte
	testhelp.Eventually(t, 10*time.Second, "the broker SVID written for the hook", func() bool {
		got, err := brokersvid.Load(dir, time.Now())
		if err != nil || got.SVID.ID != me {
			return false
		}
		first = got.SVID.Certificates[0].Raw
		return true
	})
	testhelp.Eventually(t, 10*time.Second, "the container served over the Broker API", func() bool {
		return r.Count() == 1 && !bytes.Equal(n.validCert(id), hooks)
	})
	served := n.validCert(id)
	// One bundle stream: the agent's, which tells whether it is
	// reachable; containers' bundles come with their SVIDs.
	testhelp.Eventually(t, 10*time.Second, "the agent's bundle stream open, reachable", func() bool {
		rep := r.Report()
		return n.agent.BundleStreams() == 1 && len(rep.Agents) == 1 && rep.Agents[0].Reachable && rep.Agents[0].Socket == brokerSocket
	})

	// A rotation reaches the container and the broker SVID alike.
	n.agent.Rotate()
	testhelp.Eventually(t, 10*time.Second, "rotation written", func() bool { return !bytes.Equal(n.validCert(id), served) })
	testhelp.Eventually(t, 10*time.Second, "broker SVID renewed", func() bool {
		got, err := brokersvid.Load(dir, time.Now())
		return err == nil && !bytes.Equal(got.SVID.Certificates[0].Raw, first)
	})
}
