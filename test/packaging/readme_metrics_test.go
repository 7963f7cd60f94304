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

	"github.com/noderesource/spiffe-oci-hook/internal/metrics"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
)

var metricName = regexp.MustCompile(`spiffe_oci_[a-z_]+`)

// TestReadmeMetrics: docs/operations.md's metric table lists exactly the metrics
// the refresher exposes, and its example alerts use only those.
func TestReadmeMetrics(t *testing.T) {
	now := time.Now()
	m := metrics.New(func() status.Report {
		return status.Report{
			Version: "test", Scanned: true,
			Agents:     []status.Agent{{Socket: "/run/admin.sock", Reachable: true}},
			Containers: []status.Container{{ID: "c", NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Minute)}},
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

	data, err := os.ReadFile(filepath.Join(pkgRoot(t), "docs", "operations.md"))
	if err != nil {
		t.Fatal(err)
	}
	var documented []string
	var rules string
	inRules := false
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "| `spiffe_oci_") {
			documented = append(documented, metricName.FindString(line))
		}
		switch {
		case line == "kind: PrometheusRule":
			inRules = true
		case inRules && line == "```":
			inRules = false
		}
		if inRules {
			rules += line + "\n"
		}
	}
	slices.Sort(documented)
	if !slices.Equal(exposed, documented) {
		t.Errorf("docs/operations.md documents metrics %q; the refresher exposes %q", documented, exposed)
	}

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
	if err := yaml.Unmarshal([]byte(rules), &rule); err != nil {
		t.Fatalf("docs/operations.md PrometheusRule: %v", err)
	}
	n := 0
	for _, g := range rule.Spec.Groups {
		for _, r := range g.Rules {
			n++
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
	if n < 2 {
		t.Errorf("docs/operations.md PrometheusRule has %d alerts, want the expiry and the agent alerts", n)
	}
}
