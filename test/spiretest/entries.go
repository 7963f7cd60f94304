package spiretest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ServerCLI runs `spire-server ARGS...` and returns its stdout; it fails
// the test on error. Pass -socketPath s.ServerSocket yourself.
func (s *SPIRE) ServerCLI(t testing.TB, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(s.serverBin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("spiretest: spire-server %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.Bytes()
}

// CreateEntry registers spiffeID for selectors ("type:value", e.g.
// "unix:uid:0"), parented to the agent, and returns the entry ID. x509TTL 0
// uses the server default.
func (s *SPIRE) CreateEntry(t testing.TB, spiffeID string, selectors []string, x509TTL time.Duration) string {
	t.Helper()
	return s.CreateFederatedEntry(t, spiffeID, selectors, x509TTL)
}

// CreateFederatedEntry is CreateEntry for an entry that federates with the
// trust domains federatesWith (names, e.g. "partner.test"): its SVIDs'
// holders get those domains' bundles too.
func (s *SPIRE) CreateFederatedEntry(t testing.TB, spiffeID string, selectors []string, x509TTL time.Duration, federatesWith ...string) string {
	t.Helper()
	var extra []string
	for _, td := range federatesWith {
		extra = append(extra, "-federatesWith", "spiffe://"+td)
	}
	if x509TTL > 0 {
		extra = append(extra, "-x509SVIDTTL", strconv.Itoa(int(x509TTL/time.Second)))
	}
	return s.CreateEntryArgs(t, spiffeID, selectors, extra...)
}

// CreateEntryArgs is CreateEntry with further `spire-server entry create`
// flags (e.g. "-jwtSVIDTTL", "120"); it returns the entry ID.
func (s *SPIRE) CreateEntryArgs(t testing.TB, spiffeID string, selectors []string, extra ...string) string {
	t.Helper()
	args := []string{"entry", "create", "-socketPath", s.ServerSocket,
		"-parentID", s.AgentID, "-spiffeID", spiffeID, "-output", "json"}
	for _, sel := range selectors {
		args = append(args, "-selector", sel)
	}
	out := s.ServerCLI(t, append(args, extra...)...)
	var resp struct {
		Results []struct {
			Status struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"status"`
			Entry struct {
				ID string `json:"id"`
			} `json:"entry"`
		} `json:"results"`
	}
	if err := json.Unmarshal(out, &resp); err != nil {
		t.Fatalf("spiretest: parsing entry create output %q: %v", out, err)
	}
	if len(resp.Results) != 1 || resp.Results[0].Status.Code != 0 || resp.Results[0].Entry.ID == "" {
		t.Fatalf("spiretest: entry create failed: %s", out)
	}
	return resp.Results[0].Entry.ID
}

// DeleteEntry deletes a registration entry.
func (s *SPIRE) DeleteEntry(t testing.TB, entryID string) {
	t.Helper()
	s.ServerCLI(t, "entry", "delete", "-socketPath", s.ServerSocket, "-entryID", entryID)
}

// WaitSynced blocks until every entry created so far has reached the
// agent: the agent syncs a full snapshot, so a sentinel entry created
// last being served means the earlier ones are too. The sentinel is for a
// sleep run as uid (0: as the caller, root); deleted at the end, but gone
// from the agent only at its next sync, it matches any process of that
// uid and executable meanwhile, so a caller whose tests run sleep as root
// gives a uid of its own.
func (s *SPIRE) WaitSynced(t testing.TB, uid uint32) {
	t.Helper()
	id := fmt.Sprintf("spiffe://%s/sentinel/%d", s.TrustDomain, time.Now().UnixNano())
	sleep := exec.Command("sleep", "60")
	if uid != 0 {
		sleep.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	}
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleep.Process.Kill(); sleep.Wait() }()
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", sleep.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	entry := s.CreateEntry(t, id, []string{fmt.Sprintf("unix:uid:%d", uid), "unix:path:" + exe}, time.Hour)
	s.WaitForSVID(t, sleep.Process.Pid, id, 60*time.Second)
	s.DeleteEntry(t, entry)
}

// BundlePEM returns the server's X.509 trust bundle (CA certificates) as PEM.
func (s *SPIRE) BundlePEM(t testing.TB) []byte {
	t.Helper()
	return s.ServerCLI(t, "bundle", "show", "-socketPath", s.ServerSocket, "-format", "pem")
}

// TrustBundle returns the server's X.509 trust bundle.
func (s *SPIRE) TrustBundle(t testing.TB) *x509bundle.Bundle {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString(s.TrustDomain)
	b, err := x509bundle.Parse(td, s.BundlePEM(t))
	if err != nil {
		t.Fatalf("spiretest: parsing bundle: %v", err)
	}
	return b
}
