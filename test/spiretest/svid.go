package spiretest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// DelegatedClient dials the agent's admin socket. The returned func closes
// the connection (it is also closed by t.Cleanup). The caller is the test
// process, authorized as s.HarnessID.
func (s *SPIRE) DelegatedClient(t testing.TB) (delegatedidentityv1.DelegatedIdentityClient, func()) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+s.AdminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("spiretest: dialing admin socket: %v", err)
	}
	var once sync.Once
	closeFn := func() { once.Do(func() { _ = conn.Close() }) }
	t.Cleanup(closeFn)
	return delegatedidentityv1.NewDelegatedIdentityClient(conn), closeFn
}

// WaitForSVID blocks until the agent's Delegated Identity API hands out an
// X.509 SVID with spiffeID for pid, and returns it. It fails the test after
// timeout, reporting the last error or the IDs that were offered.
func (s *SPIRE) WaitForSVID(t testing.TB, pid int, spiffeID string, timeout time.Duration) *x509svid.SVID {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	subscribe := s.brokerSubscribeOnce(t)
	if subscribe == nil {
		client, closeConn := s.DelegatedClient(t)
		defer closeConn()
		subscribe = func(ctx context.Context, pid int, spiffeID string) (*x509svid.SVID, string, error) {
			return subscribeOnce(ctx, client, pid, spiffeID)
		}
	}

	var last string
	for attempt := 0; ; attempt++ {
		s.mu.Lock()
		agent := s.agent
		s.mu.Unlock()
		if agent == nil || agent.exited() {
			s.dumpLogs(t)
			t.Fatalf("spiretest: WaitForSVID(%d, %s): agent is not running (%v)", pid, spiffeID, agentErr(agent))
		}
		svid, desc, err := subscribe(ctx, pid, spiffeID)
		if svid != nil {
			return svid
		}
		if err != nil {
			last = err.Error()
		} else {
			last = desc
		}
		if ctx.Err() != nil {
			s.dumpLogs(t)
			t.Fatalf("spiretest: WaitForSVID(pid %d, %s): not issued within %s; last: %s", pid, spiffeID, timeout, last)
		}
		// Back off briefly before re-subscribing after an error (the usual
		// one is PermissionDenied until the harness entry reaches the agent).
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func agentErr(p *proc) error {
	if p == nil {
		return errors.New("never started")
	}
	return p.err
}

// subscribeOnce runs one SubscribeToX509SVIDs stream for up to a few
// seconds, returning the wanted SVID, or a description of what was seen.
func subscribeOnce(ctx context.Context, client delegatedidentityv1.DelegatedIdentityClient, pid int, spiffeID string) (*x509svid.SVID, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	stream, err := client.SubscribeToX509SVIDs(ctx, &delegatedidentityv1.SubscribeToX509SVIDsRequest{Pid: int32(pid)})
	if err != nil {
		return nil, "", err
	}
	desc := "no reply"
	for {
		resp, err := stream.Recv()
		if err != nil {
			if status.Code(err) == codes.DeadlineExceeded || errors.Is(err, context.DeadlineExceeded) {
				return nil, desc, nil
			}
			return nil, desc, err
		}
		var ids []string
		for _, sv := range resp.GetX509Svids() {
			id := sv.GetX509Svid().GetId()
			got := "spiffe://" + id.GetTrustDomain() + id.GetPath()
			ids = append(ids, got)
			if got != spiffeID {
				continue
			}
			var raw []byte
			for _, c := range sv.GetX509Svid().GetCertChain() {
				raw = append(raw, c...)
			}
			svid, err := x509svid.ParseRaw(raw, sv.GetX509SvidKey())
			if err != nil {
				return nil, "", fmt.Errorf("parsing SVID %s: %w", got, err)
			}
			return svid, "", nil
		}
		desc = fmt.Sprintf("reply with %d SVIDs %v", len(ids), ids)
	}
}
