package spiretest_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/noderesource/spiffe-oci-hook/test/spiretest"
)

// startSleep starts `sleep 60` and returns its pid and the path its
// /proc/PID/exe resolves to (what the unix attestor reports as unix:path).
func startSleep(t *testing.T) (int, string) {
	t.Helper()
	sleepBin, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatalf("no sleep binary: %v", err)
	}
	cmd := exec.Command(sleepBin, "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	exe, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(cmd.Process.Pid), "exe"))
	if err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid, exe
}

func verify(t *testing.T, s *spiretest.SPIRE, svid *x509svid.SVID, want string) {
	t.Helper()
	if got := svid.ID.String(); got != want {
		t.Fatalf("SVID ID = %s, want %s", got, want)
	}
	id, chains, err := x509svid.Verify(svid.Certificates, s.TrustBundle(t))
	if err != nil {
		t.Fatalf("SVID does not verify against the trust bundle: %v", err)
	}
	if id.String() != want || len(chains) == 0 {
		t.Fatalf("verified ID %s (chains %d), want %s", id, len(chains), want)
	}
}

func TestSVIDForPid(t *testing.T) {
	spiretest.RequireRoot(t)
	s := spiretest.Start(t, spiretest.Options{})

	pid, exe := startSleep(t)
	const id = "spiffe://example.org/workload/sleep"
	start := time.Now()
	s.CreateEntry(t, id, []string{"unix:uid:0", "unix:path:" + exe}, 60*time.Second)
	svid := s.WaitForSVID(t, pid, id, 30*time.Second)
	t.Logf("SVID for pid %d (%s) issued %s after entry creation; expires %s",
		pid, exe, time.Since(start).Round(time.Millisecond), svid.Certificates[0].NotAfter.Format(time.RFC3339))
	verify(t, s, svid, id)
	if ttl := svid.Certificates[0].NotAfter.Sub(svid.Certificates[0].NotBefore); ttl > 2*time.Minute {
		t.Errorf("SVID TTL %s, want ~60s", ttl)
	}

	// The delegated client helper works for callers doing their own RPCs.
	client, closeFn := s.DelegatedClient(t)
	defer closeFn()
	if client == nil {
		t.Fatal("nil client")
	}
}

func TestAgentRestart(t *testing.T) {
	spiretest.RequireRoot(t)
	s := spiretest.Start(t, spiretest.Options{TrustDomain: "restart.test"})

	pid, exe := startSleep(t)
	const id = "spiffe://restart.test/workload/sleep"
	entryID := s.CreateEntry(t, id, []string{"unix:uid:0", "unix:path:" + exe}, 30*time.Second)
	verify(t, s, s.WaitForSVID(t, pid, id, 30*time.Second), id)

	s.StopAgent(t)
	if _, err := os.Stat(s.AdminSocket); !os.IsNotExist(err) {
		t.Errorf("admin socket still present after StopAgent: %v", err)
	}
	s.StartAgent(t)
	verify(t, s, s.WaitForSVID(t, pid, id, 30*time.Second), id)

	s.KillAgent(t)
	if s.AgentRunning() {
		t.Fatal("agent still running after KillAgent")
	}
	s.StartAgent(t)
	verify(t, s, s.WaitForSVID(t, pid, id, 30*time.Second), id)

	// A second SPIFFE ID for the same process shows up too; deleting the
	// first entry leaves it alone.
	const id2 = "spiffe://restart.test/workload/sleep2"
	s.CreateEntry(t, id2, []string{"unix:path:" + exe}, 0)
	s.WaitForSVID(t, pid, id2, 30*time.Second)
	s.DeleteEntry(t, entryID)
	s.WaitForSVID(t, pid, id2, 30*time.Second)
}
