package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/status"
	"github.com/noderesource/spiffe-oci-hook/test/cluster/localcluster"
	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// certDir is where the test pods ask for their identity.
const certDir = "/var/run/secrets/spiffe"

// printID is the test pods' command: first the SPIFFE ID, read from the
// delivered certificate's URI SAN (busybox has no x509 tool: the DER is
// walked with od and awk for a URI SAN, tag 0x86, holding "spiffe:"),
// then the leaf certificate itself, then idle until stopped.
const printID = `f=` + certDir + `/svid.pem
leaf() { sed -n '1,/END CERTIFICATE/p' "$f"; }
id=$(leaf | grep -v -- ----- | base64 -d | od -An -v -tu1 | awk '{for(i=1;i<=NF;i++)b[n++]=$i} END{for(i=0;i+9<n;i++) if(b[i]==134&&b[i+2]==115&&b[i+3]==112&&b[i+4]==105&&b[i+5]==102&&b[i+6]==102&&b[i+7]==101&&b[i+8]==58){s="";for(j=0;j<b[i+1];j++)s=s sprintf("%c",b[i+2+j]);print s;exit}}')
echo "SPIFFE ID: $id"
leaf
trap 'exit 0' TERM
sleep 3600 & wait
`

// podSpec is a pod template's metadata and spec (indented for a
// Deployment's template or a Pod), asking for an identity for container
// app. On containerd the pod also requires the NRI plugin (the overlay's
// README recommends it): created while the plugin is away, it waits.
func (e *env) podSpec(sa, indent string) string {
	ann := fmt.Sprintf("identity.noderesource.dev/container.app: |\n  - cert_dir: %s\n", certDir)
	if e.Runtime == "containerd" {
		ann += `required-plugins.noderesource.dev/pod: '["spiffe-oci-hook"]'` + "\n"
	}
	spec := "metadata:\n  labels:\n    app: printid\n  annotations:\n" + indentLines(ann, "    ") +
		"spec:\n  serviceAccountName: " + sa + "\n  terminationGracePeriodSeconds: 1\n" +
		"  containers:\n  - name: app\n    image: " + localcluster.BusyboxImage + "\n    imagePullPolicy: Never\n" +
		"    command: [/bin/sh, -c]\n    args:\n    - |\n" + indentLines(printID, "      ")
	return indentLines(spec, indent)
}

func indentLines(s, indent string) string {
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(indent + line + "\n")
	}
	return b.String()
}

func (e *env) namespace(t *testing.T, ns string) {
	t.Helper()
	if _, err := e.Kubectl("create", "namespace", ns); err != nil {
		t.Fatal(err)
	}
}

// register applies a ClusterSPIFFEID for ns/sa (ttl 0: the server's
// default) and returns the SPIFFE ID its pods get.
func (e *env) register(t *testing.T, ns, sa string, ttl time.Duration) string {
	t.Helper()
	if _, err := e.KubectlStdin(localcluster.ClusterSPIFFEID(ns+"-"+sa, ns, sa, ttl), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", localcluster.TrustDomain, ns, sa)
}

// ownNamespace creates a namespace the default ClusterSPIFFEID leaves
// out, and a service account in it: only a ClusterSPIFFEID of the test's
// own registers its pods.
func (e *env) ownNamespace(t *testing.T, ns, sa string) {
	t.Helper()
	e.namespace(t, ns)
	if _, err := e.Kubectl("label", "namespace", ns, localcluster.NoDefaultIdentityLabel+"=false"); err != nil {
		t.Fatal(err)
	}
	if sa != "default" {
		if _, err := e.Kubectl("-n", ns, "create", "serviceaccount", sa); err != nil {
			t.Fatal(err)
		}
	}
}

// podNames lists the pods of ns with label app=printid.
func (e *env) podNames(t *testing.T, ns string) []string {
	t.Helper()
	out, err := e.Kubectl("-n", ns, "get", "pods", "-l", "app=printid", "-o", "jsonpath={.items[*].metadata.name}")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(out))
}

// podID waits for the pod's log to hold its SPIFFE ID and certificate.
func (e *env) podID(t *testing.T, ns, pod string) string {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := e.Kubectl("-n", ns, "logs", pod)
		if err == nil && strings.Contains(string(out), "END CERTIFICATE") {
			return spiffeIDOf(t, string(out))
		}
		if time.Now().After(deadline) {
			describe(t, e.Cluster, ns)
			t.Fatalf("pod %s/%s printed no identity: %v\n%s", ns, pod, err, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// twoNamespaces: a Deployment of 3 replicas in each of two namespaces;
// every pod prints its SPIFFE ID first, and each namespace gets its own:
// shop's from the SPIRE chart's default ClusterSPIFFEID, bank's from a
// ClusterSPIFFEID of its own with 60 s SVIDs (which takes precedence over
// the default, a fallback).
func twoNamespaces(t *testing.T, e *env) {
	want := map[string]string{}
	for _, ns := range []string{"shop", "bank"} {
		e.namespace(t, ns)
		if ns == "bank" {
			want[ns] = e.register(t, ns, "default", time.Minute)
		} else {
			want[ns] = fmt.Sprintf("spiffe://%s/ns/%s/sa/default", localcluster.TrustDomain, ns)
		}
		deploy := fmt.Sprintf("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: printid\n  namespace: %s\nspec:\n  replicas: 3\n  selector:\n    matchLabels:\n      app: printid\n  template:\n%s", ns, e.podSpec("default", "    "))
		if _, err := e.KubectlStdin(deploy, "apply", "-f", "-"); err != nil {
			t.Fatal(err)
		}
	}
	e.rotatingNS = "bank"
	for _, ns := range []string{"shop", "bank"} {
		if err := e.Rollout(ns, "deployment/printid", 3*time.Minute); err != nil {
			describe(t, e.Cluster, ns)
			t.Fatal(err)
		}
		pods := e.podNames(t, ns)
		if len(pods) != 3 {
			t.Fatalf("%s: %d pods, want 3: %v", ns, len(pods), pods)
		}
		for _, p := range pods {
			if got := e.podID(t, ns, p); got != want[ns] {
				t.Errorf("pod %s/%s printed %s, want %s", ns, p, got, want[ns])
			}
		}
	}
	// The hook handed the containers to the DaemonSet's refresher, whose
	// metrics socket is in the host's state directory.
	if got := handoffs(t); got < 6 {
		t.Errorf("the refresher took %v containers over from the hook, want at least the 6 pods'", got)
	}
}

// handoffs reads how many containers the node's refresher took over from
// the hook since it started.
func handoffs(t *testing.T) float64 {
	t.Helper()
	socket := filepath.Join(localcluster.StateDir, "refresher.sock")
	code, body, err := status.NewClient(socket).Get(context.Background(), status.PathMetrics)
	if err != nil || code != 200 {
		t.Fatalf("GET %s on %s: HTTP %d, %v", status.PathMetrics, socket, code, err)
	}
	return testhelp.MetricSum(t, body, "spiffe_oci_handoffs_total")
}

// serial reads the serial number of the certificate in a pod's files.
func (e *env) serial(t *testing.T, ns, pod string) string {
	t.Helper()
	out, err := e.Kubectl("-n", ns, "exec", pod, "--", "cat", certDir+"/svid.pem")
	if err != nil {
		t.Fatal(err)
	}
	return certSerial(t, out)
}

// agentRestart: the SPIRE agent's pod goes away and comes back (a new
// pod, as after a node's agent upgrade): the delivered files stay valid
// meanwhile, the refresher's pod turns NotReady, then Ready once the new
// agent serves, and rotation resumes. The pod is kept away (a nodeSelector
// no node matches) until the refresher's readiness probe, every 10 s, has
// seen it gone: a plain `kubectl delete pod` is back within seconds and
// the probe may never notice.
func agentRestart(t *testing.T, e *env) {
	if e.rotatingNS == "" {
		t.Skip("needs twoNamespaces")
	}
	ns := e.rotatingNS
	pod := e.podNames(t, ns)[0]
	before := e.serial(t, ns, pod)
	if _, err := e.Kubectl("-n", "spire", "patch", "daemonset", "spire-agent", "--type", "merge",
		"-p", `{"spec":{"template":{"spec":{"nodeSelector":{"spiffe-oci-hook.test/agent":"away"}}}}}`); err != nil {
		t.Fatal(err)
	}
	gone := time.Now()
	if err := e.waitReady(localcluster.ProjectNamespace, "app.kubernetes.io/name=spiffe-oci-hook", "False", 90*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("refresher NotReady %.1fs after the agent's pod was removed", time.Since(gone).Seconds())
	// The files stay while the agent is away, the certificate valid.
	if got := e.serial(t, ns, pod); got != before {
		t.Logf("rotated before the agent went away (serial %s -> %s)", before, got)
		before = got
	}
	if _, err := e.Kubectl("-n", "spire", "patch", "daemonset", "spire-agent", "--type", "json",
		"-p", `[{"op":"remove","path":"/spec/template/spec/nodeSelector"}]`); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	if err := e.Rollout("spire", "daemonset/spire-agent", 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := e.waitReady(localcluster.ProjectNamespace, "app.kubernetes.io/name=spiffe-oci-hook", "True", 90*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("refresher Ready %.1fs after the agent's pod came back", time.Since(back).Seconds())
	// Rotation resumes: the 60 s SVID is replaced at half its life.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		after := e.serial(t, ns, pod)
		if after != before {
			t.Logf("rotated after the agent's restart (serial %s -> %s)", before, after)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no rotation within 2 minutes of the agent's restart (serial %s)", before)
		}
		time.Sleep(2 * time.Second)
	}
}

// waitReady waits for the Ready condition of the pods with label sel to
// be want ("True" or "False").
func (e *env) waitReady(ns, sel, want string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		out, err := e.Kubectl("-n", ns, "get", "pods", "-l", sel, "-o", `jsonpath={.items[*].status.conditions[?(@.type=="Ready")].status}`)
		if err == nil && strings.TrimSpace(string(out)) == want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pods %s/%s: Ready is %q after %s, want %s", ns, sel, out, d, want)
		}
		time.Sleep(time.Second)
	}
}
