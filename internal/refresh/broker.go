package refresh

import (
	"context"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
)

// dial returns a client of the node's agent API on socket.
func (r *Refresher) dial(socket string, opts ...grpc.DialOption) (*agent.Client, error) {
	if r.cfg.AgentAPI == config.APIBroker {
		return agent.NewBroker(socket, r.brokerID, opts...)
	}
	return agent.New(socket, opts...)
}

// followBrokerSVID keeps the broker SVID (this process's own X.509-SVID,
// which the agent's Broker API authenticates) fresh from the agent's
// Workload API until ctx ends: in memory for the refresher's own calls,
// and in the state directory for the hook's. go-spiffe's watcher
// reconnects with backoff when the agent goes away.
func (r *Refresher) followBrokerSVID(ctx context.Context) {
	socket := r.cfg.WorkloadAPISocket
	w := &brokerWatcher{r: r, dir: brokersvid.Dir(r.cfg.StateDir), socket: socket}
	err := workloadapi.WatchX509Context(ctx, w, workloadapi.WithAddr("unix://"+socket))
	if ctx.Err() == nil && err != nil {
		r.log.Error("broker SVID: watching the agent's Workload API stopped; the hook will refuse containers once the broker SVID expires",
			logkey.WorkloadAPISocket, socket, logkey.Error, err)
	}
}

type brokerWatcher struct {
	r      *Refresher
	dir    string
	socket string
	failed bool
}

func (w *brokerWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	svid := c.DefaultSVID()
	if want := w.r.cfg.BrokerSPIFFEID; want != "" {
		svid = nil
		for _, s := range c.SVIDs {
			if s.ID.String() == want {
				svid = s
			}
		}
		if svid == nil {
			w.OnX509ContextWatchError(fmt.Errorf("none of this process's SVIDs is broker_spiffe_id %s", want))
			return
		}
	}
	if svid == nil {
		w.OnX509ContextWatchError(fmt.Errorf("the agent returned no X.509-SVID for this process"))
		return
	}
	bundle, err := c.Bundles.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
	if err != nil {
		w.OnX509ContextWatchError(err)
		return
	}
	id := &brokersvid.Identity{SVID: svid, Bundle: bundle}
	w.r.brokerID.Set(id)
	if err := brokersvid.Write(w.r.Writer, w.dir, id); err != nil {
		w.r.log.Error("broker SVID: writing it for the hook", "dir", w.dir, logkey.Error, err)
		return
	}
	if w.failed {
		w.r.log.Info("broker SVID: renewed again", logkey.SPIFFEID, svid.ID.String())
	}
	w.failed = false
	w.r.log.Debug("broker SVID renewed", logkey.SPIFFEID, svid.ID.String(), logkey.Expires, svid.Certificates[0].NotAfter)
}

func (w *brokerWatcher) OnX509ContextWatchError(err error) {
	if w.failed {
		return
	}
	w.failed = true
	w.r.log.Warn("broker SVID: no SVID for this process from the agent's Workload API (is the agent up? is spiffe-oci-refresher registered with unix:uid:0 and unix:path:<its binary>, and that SPIFFE ID in the agent's experimental.broker brokers?); the current one stays in use until it expires; retrying",
		logkey.WorkloadAPISocket, w.socket, logkey.Error, err)
}
