package agent

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/noderesource/spiffe-oci-hook/test/fakeagent"
)

// apis starts a fake agent behind each of the two APIs and returns a
// client of each.
func apis(t *testing.T) map[string]func(t *testing.T) (*fakeagent.Agent, *Client) {
	return map[string]func(t *testing.T) (*fakeagent.Agent, *Client){
		"delegated": start,
		"broker": func(t *testing.T) (*fakeagent.Agent, *Client) {
			a, _, c := startBroker(t, hookBroker, hookBroker)
			return a, c
		},
	}
}

// TestFetchX509WaitsForEntry: a pid no entry matches yet gets an empty
// update; the SVID that follows on the same stream once the entry reaches
// the agent is delivered, with no second stream.
func TestFetchX509WaitsForEntry(t *testing.T) {
	for name, open := range apis(t) {
		t.Run(name, func(t *testing.T) {
			a, c := open(t)
			web := spiffeid.RequireFromString("spiffe://example.org/ns/new/sa/web")
			go func() {
				time.Sleep(300 * time.Millisecond)
				a.Set(4242, web)
			}()
			svids, bundles, err := c.FetchX509(ctx(t, 10*time.Second), 4242, Wait{For: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			if svids.SVIDs[0].ID != web || bundles == nil {
				t.Fatalf("got %s, bundles %v", IDs(svids.SVIDs), bundles)
			}
			if n := a.SVIDCalls(); n != 1 {
				t.Fatalf("%d SVID streams opened, want the one that waited", n)
			}
		})
	}
}

// TestFetchX509WaitRunsOut: no entry within the wait is ErrNoIdentity,
// and the message says how long it waited; the streams are closed.
func TestFetchX509WaitRunsOut(t *testing.T) {
	for name, open := range apis(t) {
		t.Run(name, func(t *testing.T) {
			a, c := open(t)
			_, _, err := c.FetchX509(ctx(t, 10*time.Second), 4242, Wait{For: 300 * time.Millisecond})
			if !errors.Is(err, ErrNoIdentity) {
				t.Fatalf("error = %v, want ErrNoIdentity", err)
			}
			var waited *ErrWaited
			if !errors.As(err, &waited) || waited.Waited < 300*time.Millisecond {
				t.Fatalf("error %v does not say it waited the 300ms", err)
			}
			for _, want := range []string{"waited 300ms for a registration entry", "no registration entry matches", "pid 4242"} {
				if !strings.Contains(err.Error(), want) {
					t.Fatalf("error %q lacks %q", err, want)
				}
			}
			waitStreamsClosed(t, a)
		})
	}
}

// TestFetchX509NoWait: with no wait the first empty answer decides, as
// the refresher's callers and Wait{} expect.
func TestFetchX509NoWait(t *testing.T) {
	_, c := start(t)
	_, _, err := c.FetchX509(ctx(t, 10*time.Second), 4242, Wait{})
	var waited *ErrWaited
	if !errors.Is(err, ErrNoIdentity) || errors.As(err, &waited) {
		t.Fatalf("error = %v, want a bare ErrNoIdentity", err)
	}
}

// TestFetchX509RetriesUnavailable: an agent that restarts (Unavailable)
// within the wait is asked again; the context still bounds it all.
func TestFetchX509RetriesUnavailable(t *testing.T) {
	a, c := start(t)
	web := spiffeid.RequireFromString("spiffe://example.org/web")
	a.Set(7, web)
	a.Configure(func(a *fakeagent.Agent) { a.Refuse = status.Error(codes.Unavailable, "agent is starting") })
	go func() {
		time.Sleep(400 * time.Millisecond)
		a.Configure(func(a *fakeagent.Agent) { a.Refuse = nil })
	}()
	svids, _, err := c.FetchX509(ctx(t, 10*time.Second), 7, Wait{For: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if svids.SVIDs[0].ID != web || a.SVIDCalls() < 2 {
		t.Fatalf("got %s after %d calls, want a retry", IDs(svids.SVIDs), a.SVIDCalls())
	}

	// Past the wait, the last error is returned, saying it retried.
	a.Configure(func(a *fakeagent.Agent) { a.Refuse = status.Error(codes.Unavailable, "agent is starting") })
	_, _, err = c.FetchX509(ctx(t, 10*time.Second), 7, Wait{For: 300 * time.Millisecond})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "retried for") {
		t.Fatalf("error = %v, want ErrUnavailable after retries", err)
	}
	// ctx bounds the wait.
	begin := time.Now()
	_, _, err = c.FetchX509(ctx(t, 200*time.Millisecond), 7, Wait{For: time.Minute})
	if err == nil || time.Since(begin) > 5*time.Second {
		t.Fatalf("error = %v after %s, want a failure at the context's deadline", err, time.Since(begin))
	}
}

// TestFetchX509AttestationNotRetriedWhenGone: a failed attestation of a
// process that exited is final.
func TestFetchX509AttestationNotRetriedWhenGone(t *testing.T) {
	a, c := start(t)
	a.Configure(func(a *fakeagent.Agent) {
		a.Refuse = status.Error(codes.Unavailable, "workload attestation failed: no such process")
	})
	gone := errors.New("gone")
	_, _, err := c.FetchX509(ctx(t, 10*time.Second), 7, Wait{For: time.Minute, Alive: func() error { return gone }})
	if !errors.Is(err, ErrAttestationFailed) || a.SVIDCalls() != 1 {
		t.Fatalf("error = %v after %d calls, want ErrAttestationFailed at once", err, a.SVIDCalls())
	}
}
