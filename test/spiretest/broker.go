package spiretest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/noderesource/spiffe-oci-hook/internal/agent"
	"github.com/noderesource/spiffe-oci-hook/internal/brokersvid"
)

// The SPIRE lines the tests run against.
const (
	// V113 is the compatibility line (test/spire).
	V113 = "1.13.3"
	// V115 is the primary line (test/spire115): the Delegated Identity
	// API and the SPIFFE Broker API.
	V115 = "1.15.3"
)

// pidReferenceType is the only workload reference the brokers may use.
const pidReferenceType = "type.googleapis.com/spiffe.broker.WorkloadPIDReference"

// brokerConfig is the agent's experimental.broker block (empty without
// Options.Broker): the harness and opts.Brokers, PID references only.
func (s *SPIRE) brokerConfig(opts Options) string {
	if !opts.Broker {
		return ""
	}
	var brokers []string
	for _, id := range append([]string{s.HarnessID}, opts.Brokers...) {
		brokers = append(brokers, fmt.Sprintf(`{ id = %s, allowed_reference_types = [{ type_url = %q }] }`, strconv.Quote(id), pidReferenceType))
	}
	return fmt.Sprintf(`        broker {
            socket_path = %q
            brokers = [
                %s
            ]
        }`, s.BrokerSocket, strings.Join(brokers, ",\n                "))
}

// HarnessIdentity returns the harness's own X.509-SVID (s.HarnessID) and
// its trust domain's bundle, from the agent's Workload API: with
// Options.Broker, a broker identity the agent admits.
func (s *SPIRE) HarnessIdentity(t testing.TB) *brokersvid.Identity {
	t.Helper()
	return s.harnessBroker(t, false)
}

// harnessBroker fetches the harness's SVID from the Workload API, retrying
// until the agent has it (startTimeout), or failing at once unless wait.
func (s *SPIRE) harnessBroker(t testing.TB, wait bool) *brokersvid.Identity {
	t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr("unix://"+s.WorkloadSocket))
		cancel()
		if err == nil {
			for _, svid := range c.SVIDs {
				if svid.ID.String() != s.HarnessID {
					continue
				}
				b, err := c.Bundles.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
				if err != nil {
					t.Fatalf("spiretest: Workload API: %v", err)
				}
				return &brokersvid.Identity{SVID: svid, Bundle: b}
			}
			err = fmt.Errorf("no SVID for %s among %d", s.HarnessID, len(c.SVIDs))
		}
		if !wait || time.Now().After(deadline) {
			s.dumpLogs(t)
			t.Fatalf("spiretest: the harness's SVID from the Workload API: %v", err)
		}
		if !s.AgentRunning() {
			s.dumpLogs(t)
			t.Fatalf("spiretest: agent is not running")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// brokerSubscribeOnce returns, for an agent without admin socket, a
// subscribeOnce over the Broker API with the harness as broker; nil when
// the admin socket is there.
func (s *SPIRE) brokerSubscribeOnce(t testing.TB) func(ctx context.Context, pid int, spiffeID string) (*x509svid.SVID, string, error) {
	t.Helper()
	if s.AdminSocket != "" {
		return nil
	}
	id := s.harnessBroker(t, true)
	return func(ctx context.Context, pid int, spiffeID string) (*x509svid.SVID, string, error) {
		c, err := agent.NewBroker(s.BrokerSocket, id)
		if err != nil {
			return nil, "", err
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		stream, err := c.SubscribeX509SVIDs(ctx, pid)
		if err != nil {
			return nil, "", err
		}
		desc := "no reply"
		for {
			u, err := stream.Recv()
			if errors.Is(err, agent.ErrNoIdentity) {
				desc = "reply with 0 SVIDs"
				continue
			}
			if err != nil {
				if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
					return nil, desc, nil
				}
				return nil, desc, err
			}
			for _, svid := range u.SVIDs {
				if svid.ID.String() == spiffeID {
					return svid, "", nil
				}
			}
			desc = fmt.Sprintf("reply with SVIDs %s", agent.IDs(u.SVIDs))
		}
	}
}

// HelperBinary returns spiffe-helper, built with the V113 line by
// test/spire (the benchmarks' yardstick; it needs no particular agent).
func HelperBinary(t testing.TB) string {
	t.Helper()
	server, _ := VersionBinaries(t, V113)
	helper := filepath.Join(filepath.Dir(server), "spiffe-helper")
	if _, err := os.Stat(helper); err != nil {
		t.Fatalf("spiretest: spiffe-helper is missing next to %s: run test/spire/build.sh (make spire)", server)
	}
	return helper
}
