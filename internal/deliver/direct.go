package deliver

import (
	"context"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/handoff"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// Direct delivers over a client made for this container alone: the hook's
// own path, when no refresher takes the container over.
func (d *Deliverer) Direct(ctx context.Context, proc *process.Process, req handoff.Request) (statedir.Record, error) {
	return d.Deliver(ctx, d.connect, proc, req)
}

// connect returns a client of the node's agent API on socket. With the
// Broker API it presents the broker SVID the refresher keeps in the state
// directory: a file read, no call to the agent.
func (d *Deliverer) connect(socket string) (Agent, error) {
	var client *agent.Client
	var err error
	if d.Config.AgentAPI != config.APIBroker {
		client, err = agent.New(socket)
	} else {
		var id *brokersvid.Identity
		if id, err = brokersvid.Load(brokersvid.Dir(d.Config.StateDir), time.Now()); err != nil {
			return Agent{}, err
		}
		client, err = agent.NewBroker(socket, id)
	}
	if err != nil {
		return Agent{}, err
	}
	return Agent{Client: client, Close: client.Close}, nil
}
