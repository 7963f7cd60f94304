package cri

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/benchmd"
)

// The CRI benchmarks (make bench, SPIFFE_OCI_BENCH=1) each write one
// section of BENCHMARKS.md (test/benchmd), after test/bench has rewritten
// the rest of it: a run of only these replaces only their sections.

// writeSection writes section name of BENCHMARKS.md.
func writeSection(t *testing.T, name, md string) {
	t.Helper()
	path, err := benchmd.WriteSection(repoRoot, name, md)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote section %q of %s", name, path)
}

// samples is a set of durations.
type samples []time.Duration

func (s samples) q(p float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	c := slices.Clone(s)
	slices.Sort(c)
	i := int(float64(len(c)-1)*p + 0.5)
	return c[i]
}

func (s samples) median() time.Duration { return s.q(0.5) }
func (s samples) p95() time.Duration    { return s.q(0.95) }
func (s samples) p99() time.Duration    { return s.q(0.99) }
func (s samples) max() time.Duration    { return s.q(1) }

func msf(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/1e6) }
func sec(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

func signed(d time.Duration) string {
	if d >= 0 {
		return "+" + msf(d)
	}
	return msf(d)
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func envList(name string, def []string) []string {
	if v := os.Getenv(name); v != "" {
		return strings.Split(v, ",")
	}
	return def
}

// agentNoHashing restarts the node's agent with workload_size_limit = -1
// (configuration B of BENCHMARKS.md: the unix attestor hashes no
// executables), waiting until it serves again.
func agentNoHashing(t *testing.T, n *node) {
	t.Helper()
	conf := filepath.Join(n.spire.Dir, "agent.conf")
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	const key = "discover_workload_path = true"
	if !strings.Contains(string(data), key) {
		t.Fatalf("%s has no %q", conf, key)
	}
	if !strings.Contains(string(data), "workload_size_limit") {
		data = []byte(strings.Replace(string(data), key, key+"\n            workload_size_limit = -1", 1))
	}
	n.spire.StopAgent(t)
	if err := os.WriteFile(conf, data, 0o644); err != nil {
		t.Fatal(err)
	}
	n.spire.StartAgent(t)
	n.waitSynced(t)
}

// agentConfigs are the two agent configurations of BENCHMARKS.md.
var agentConfigs = []struct{ name, desc string }{
	{"A", "unix attestor with discover_workload_path, default workload_size_limit: hashes executables"},
	{"B", "same agent restarted with workload_size_limit = -1: no executable hashing"},
}
