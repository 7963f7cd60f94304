package packaging

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/noderesource/spiffe-oci-hook/internal/audit"
	"github.com/noderesource/spiffe-oci-hook/internal/metrics"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

var metricName = regexp.MustCompile(`spiffe_oci_[a-z_]+`)

// TestReadmeMetrics: the metric tables of the README and docs/ list
// exactly the metrics the refresher exposes, and their example alerts use
// only those.
func TestReadmeMetrics(t *testing.T) {
	now := time.Now()
	m := metrics.New(func() status.Report {
		return status.Report{
			Version: "test", Scanned: true,
			Agents:     []status.Agent{{Socket: "/run/admin.sock", Reachable: true}},
			Containers: []status.Container{{ID: "c", NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Minute)}},
			Audit:      audit.Result{Time: now},
		}
	})
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var exposed []string
	for _, f := range fams {
		if strings.HasPrefix(f.GetName(), "spiffe_oci_") {
			exposed = append(exposed, f.GetName())
		}
	}
	slices.Sort(exposed)

	// The metrics are documented in the README and in docs/ (the audit's
	// in docs/audit.md); each file's PrometheusRule blocks are checked.
	docs, _ := filepath.Glob(filepath.Join(testhelp.RepoRoot(t), "docs", "*.md"))
	var documented []string
	var rules []string
	for _, p := range append([]string{filepath.Join(testhelp.RepoRoot(t), "README.md")}, docs...) {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		inRules := false
		for _, line := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(line, "| `spiffe_oci_") {
				documented = append(documented, metricName.FindString(line))
			}
			switch {
			case line == "kind: PrometheusRule":
				inRules = true
				rules = append(rules, "")
			case inRules && line == "```":
				inRules = false
			}
			if inRules {
				rules[len(rules)-1] += line + "\n"
			}
		}
	}
	slices.Sort(documented)
	if !slices.Equal(exposed, documented) {
		t.Errorf("README documents metrics %q; the refresher exposes %q", documented, exposed)
	}

	n := 0
	var alerts []string
	for _, block := range rules {
		var rule struct {
			Spec struct {
				Groups []struct {
					Rules []struct {
						Alert string `yaml:"alert"`
						Expr  string `yaml:"expr"`
					} `yaml:"rules"`
				} `yaml:"groups"`
			} `yaml:"spec"`
		}
		if err := yaml.Unmarshal([]byte(block), &rule); err != nil {
			t.Fatalf("PrometheusRule: %v\n%s", err, block)
		}
		for _, g := range rule.Spec.Groups {
			for _, r := range g.Rules {
				n++
				alerts = append(alerts, r.Alert)
				names := metricName.FindAllString(r.Expr, -1)
				if len(names) == 0 {
					t.Errorf("alert %s: expr %q uses no spiffe_oci_ metric", r.Alert, r.Expr)
				}
				for _, name := range names {
					if !slices.Contains(exposed, name) {
						t.Errorf("alert %s: expr uses %s, which the refresher does not expose", r.Alert, name)
					}
				}
			}
		}
	}
	if n < 3 {
		t.Errorf("the docs' PrometheusRules have %d alerts (%q), want the expiry, the agent and the unserved-container alerts", n, alerts)
	}
}
