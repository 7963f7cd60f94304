package cri

import (
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
)

// TestCRIOBroker and TestContainerdBroker run the hook and the refresher
// with agent_api broker: SPIRE 1.15.3's SPIFFE Broker API, no admin
// socket, the k8s attestor with pod-level selectors. A subset of the
// scenarios: delivery before the first command, rotation, the agent down,
// and a pod no entry matches.
func TestCRIOBroker(t *testing.T) {
	requireTools(t)
	n := newNodeAPI(t, tempDir(t, "cri-node-"), config.APIBroker)
	brokerScenarios(t, startCRIO(t, n))
}

func TestContainerdBroker(t *testing.T) {
	requireTools(t)
	n := newNodeAPI(t, tempDir(t, "cri-node-"), config.APIBroker)
	brokerScenarios(t, startContainerd(t, n).runtime)
}

func brokerScenarios(t *testing.T, r *runtime) {
	rot := startRotationWatcher(t, r)
	t.Run("two pods in different namespaces each read their own identity first", func(t *testing.T) { twoNamespaces(t, r) })
	t.Run("agent down: the hook's line and no container", func(t *testing.T) { agentDown(t, r) })
	t.Run("no entry: WORKLOAD_NOT_ENTITLED as one line and no container", func(t *testing.T) { noEntry(t, r) })
	t.Run("rotation: the refresher rotates a running container's files", func(t *testing.T) { checkRotation(t, rot) })
}

// noEntry: a pod in a namespace no entry names. SPIRE 1.15.3 answers the
// Broker API with an update without SVID; crictl's error carries the
// hook's line and the container never runs.
func noEntry(t *testing.T, r *runtime) {
	p := r.runPod(t, "stranger", "nowhere", unnamed)
	c, err := p.run(t, "app", 0, "echo STARTED; "+idle)
	if err == nil {
		t.Fatalf("a container no entry matches started")
	}
	for _, want := range []string{"spiffe-oci-hook: container ", "no registration entry matches the container's process", r.node.spire.BrokerSocket} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("crictl's error lacks %q:\n%v", want, err)
		}
	}
	notRun(t, r, p, c)
}
