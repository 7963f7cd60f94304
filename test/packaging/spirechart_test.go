package packaging

import (
	"slices"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
)

// The SPIRE chart's host paths (spiffe/helm-charts-hardened, chart spire
// 0.30.0): sockets.hostBasePath/<CSI driver name>/{admin,broker}, and the
// agent's socketPath.
const (
	spireChartAdmin    = "/run/spire/agent/sockets/csi.spiffe.io/admin/admin.sock"
	spireChartBroker   = "/run/spire/agent/sockets/csi.spiffe.io/broker/broker.sock"
	spireChartWorkload = "/run/spire/agent-sockets/spire-agent.sock"
)

// refresherAgentMounts renders the chart and returns the node config and
// the agent socket directories the refresher mounts (volume -> host path,
// checked to be mounted at the same path).
func refresherAgentMounts(t *testing.T, sets ...string) (config.Config, map[string]string, []manifest) {
	t.Helper()
	docs := decodeManifests(t, "helm template", []byte(mustTemplate(t, sets...)))
	cfg, err := config.Parse([]byte(configMapNamed(t, docs, "spiffe-oci-hook-node").Data["config.yaml"]))
	if err != nil {
		t.Fatalf("%q: rendered config.yaml: %v", sets, err)
	}
	var spec daemonSetSpec
	if err := only(docs, "DaemonSet")[0].Spec.Decode(&spec); err != nil {
		t.Fatal(err)
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Template.Spec.Volumes {
		if strings.HasPrefix(v.Name, "agent-") && v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	mounts := map[string]string{}
	for _, m := range spec.Template.Spec.Containers[0].VolumeMounts {
		if p, ok := hostPaths[m.Name]; ok {
			if m.MountPath != p || !m.ReadOnly {
				t.Errorf("%q: volume %s (host %s) mounted at %s, readOnly %v: want the host's path, read-only", sets, m.Name, p, m.MountPath, m.ReadOnly)
			}
			mounts[m.Name] = p
		}
	}
	return cfg, mounts, docs
}

// TestHelmSPIREChartPaths: values-spire-chart.yaml points the node config
// and the refresher's mounts at the sockets SPIRE's Helm chart puts on the
// host, for either agent API.
func TestHelmSPIREChartPaths(t *testing.T) {
	cfg, mounts, _ := refresherAgentMounts(t, "-f=values-spire-chart.yaml")
	if cfg.AgentAPI != config.APIDelegated || cfg.AgentAdminSocket != spireChartAdmin || !cfg.RequireRefresher {
		t.Errorf("delegated: node config %+v", cfg)
	}
	if want := map[string]string{"agent-admin": "/run/spire/agent/sockets/csi.spiffe.io/admin"}; !mapsEqual(mounts, want) {
		t.Errorf("delegated: agent mounts %v, want %v", mounts, want)
	}

	cfg, mounts, _ = refresherAgentMounts(t, "-f=values-spire-chart.yaml", "agent.api=broker", "agent.brokerSPIFFEID=spiffe://example.org/spiffe-oci-refresher")
	if cfg.AgentAPI != config.APIBroker || cfg.BrokerSocket != spireChartBroker || cfg.WorkloadAPISocket != spireChartWorkload || cfg.BrokerSPIFFEID != "spiffe://example.org/spiffe-oci-refresher" {
		t.Errorf("broker: node config %+v", cfg)
	}
	want := map[string]string{"agent-broker": "/run/spire/agent/sockets/csi.spiffe.io/broker", "agent-workload-api": "/run/spire/agent-sockets"}
	if !mapsEqual(mounts, want) {
		t.Errorf("broker: agent mounts %v, want %v", mounts, want)
	}

	// Broker socket and Workload API socket in one directory: mounted once.
	_, mounts, _ = refresherAgentMounts(t, "agent.api=broker", "agent.brokerSocket=/run/spire/sockets/broker.sock", "agent.workloadAPISocket=/run/spire/sockets/api.sock")
	if want := map[string]string{"agent-broker": "/run/spire/sockets"}; !mapsEqual(mounts, want) {
		t.Errorf("broker, one directory: agent mounts %v, want %v", mounts, want)
	}

	for _, tc := range []struct {
		sets []string
		want string
	}{
		{[]string{"agent.api=workload"}, `at '/agent/api': value must be one of 'delegated', 'broker'`},
		{[]string{"agent.api=broker", "agent.brokerSocket=broker.sock"}, `agent.brokerSocket "broker.sock" must be an absolute path`},
		{[]string{"agent.api=broker", "nodeConfig=agent_api: broker\nbroker_socket: /elsewhere.sock\n"}, `nodeConfig broker_socket "/elsewhere.sock" differs from agent.brokerSocket`},
		{[]string{"nodeConfig=agent_api: broker\n"}, `nodeConfig agent_api "broker" differs from agent.api "delegated"`},
		{[]string{"registration.enabled=true", "registration.trustDomain="}, "registration.trustDomain is required"},
		{[]string{"registration.enabled=true", "registration.hookID=spire://x"}, `at '/registration/hookID'`},
	} {
		_, stderr, err := helmTemplate(t, tc.sets...)
		if err == nil || !strings.Contains(stderr, tc.want) {
			t.Errorf("helm template %q: err %v, stderr %q; want %q", tc.sets, err, stderr, tc.want)
		}
	}
}

// registrationObject is a spire-controller-manager object as rendered.
type registrationObject struct {
	ClassName         string   `yaml:"className"`
	SPIFFEID          string   `yaml:"spiffeID"`
	ParentID          string   `yaml:"parentID"`
	Selectors         []string `yaml:"selectors"`
	SPIFFEIDTemplate  string   `yaml:"spiffeIDTemplate"`
	NamespaceSelector struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"namespaceSelector"`
	PodSelector struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"podSelector"`
}

func registrationObjects(t *testing.T, docs []manifest) map[string]registrationObject {
	t.Helper()
	out := map[string]registrationObject{}
	for _, d := range docs {
		if d.Kind != "ClusterStaticEntry" && d.Kind != "ClusterSPIFFEID" {
			continue
		}
		if d.APIVersion != "spire.spiffe.io/v1alpha1" {
			t.Errorf("%s %s: apiVersion %s", d.Kind, d.Metadata.Name, d.APIVersion)
		}
		var o registrationObject
		if err := d.Spec.Decode(&o); err != nil {
			t.Fatal(err)
		}
		out[d.Kind+"/"+d.Metadata.Name] = o
	}
	return out
}

// TestHelmRegistration: registration.enabled renders what the hook and
// the refresher need from spire-controller-manager, and nothing by default.
func TestHelmRegistration(t *testing.T) {
	_, _, docs := refresherAgentMounts(t)
	if objs := registrationObjects(t, docs); len(objs) != 0 {
		t.Fatalf("registration objects rendered by default: %v", objs)
	}

	_, _, docs = refresherAgentMounts(t, "-f=values-spire-chart.yaml", "registration.trustDomain=td.example", "registration.clusterName=prod")
	objs := registrationObjects(t, docs)
	alias := objs["ClusterStaticEntry/spiffe-oci-hook-node-alias"]
	hook := objs["ClusterStaticEntry/spiffe-oci-hook-hook"]
	refresher := objs["ClusterSPIFFEID/spiffe-oci-hook-refresher"]
	if len(objs) != 3 {
		t.Fatalf("objects %v, want the node alias, the hook and the refresher", objs)
	}
	if alias.SPIFFEID != "spiffe://td.example/spiffe-oci-hook/node/prod" || alias.ParentID != "spiffe://td.example/spire/server" || !slices.Equal(alias.Selectors, []string{"k8s_psat:cluster:prod"}) {
		t.Errorf("node alias %+v", alias)
	}
	if hook.SPIFFEID != "spiffe://td.example/spiffe-oci-hook" || hook.ParentID != alias.SPIFFEID ||
		!slices.Equal(hook.Selectors, []string{"unix:uid:0", "unix:path:/opt/spiffe-oci-hook/bin/spiffe-oci-hook-direct"}) {
		t.Errorf("hook entry %+v", hook)
	}
	if refresher.SPIFFEIDTemplate != "spiffe://td.example/spiffe-oci-refresher" ||
		refresher.NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"] != releaseNamespace ||
		refresher.PodSelector.MatchLabels["app.kubernetes.io/name"] != "spiffe-oci-hook" {
		t.Errorf("refresher ClusterSPIFFEID %+v", refresher)
	}
	for name, o := range objs {
		if o.ClassName != "spire-server-spire" {
			t.Errorf("%s: className %q, want SPIRE's chart's default class", name, o.ClassName)
		}
	}
	// The refresher's pod selector selects the DaemonSet's pods.
	var spec daemonSetSpec
	only(docs, "DaemonSet")[0].Spec.Decode(&spec)
	for k, v := range refresher.PodSelector.MatchLabels {
		if spec.Template.Metadata.Labels[k] != v {
			t.Errorf("refresher podSelector %s=%s does not select the DaemonSet's pods (%v)", k, v, spec.Template.Metadata.Labels)
		}
	}

	// The Broker API needs no hook entry (the hook presents the
	// refresher's broker SVID); a controller with watchClassless, no class.
	_, _, docs = refresherAgentMounts(t, "-f=values-spire-chart.yaml", "agent.api=broker", "registration.className=")
	objs = registrationObjects(t, docs)
	if _, ok := objs["ClusterSPIFFEID/spiffe-oci-hook-refresher"]; len(objs) != 1 || !ok {
		t.Fatalf("broker: objects %v, want the refresher's only", objs)
	}
	if c := objs["ClusterSPIFFEID/spiffe-oci-hook-refresher"].ClassName; c != "" {
		t.Errorf("registration.className empty: className %q rendered", c)
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
