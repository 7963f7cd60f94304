package audit

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
)

// TestAuditKeepsNoAnnotationText (issue 24, defect 3): tenants choose
// their annotations' size. 200 containers, each with a 250 KiB named
// annotation that matches none of them (CRI-O copies the pod's
// annotations into every container's spec), must not leave their text in
// the auditor: what it keeps between audits is bounded by the number of
// containers, not by what the pods wrote. The unmatched-name report still
// sees every such annotation.
func TestAuditKeepsNoAnnotationText(t *testing.T) {
	const containers = 200
	n := newNode(t)
	big := "- cert_dir: /certs\n#" + strings.Repeat("x", 250<<10)
	for i := range containers {
		sb := fmt.Sprintf("sb%03d", i)
		c := n.container(fmt.Sprintf("c%03d", i), crio(sb, fmt.Sprintf("web%03d", i), "app", map[string]string{
			annotations.Key + ".nosuchcontainer": big, annotations.Key: "- cert_dir: /certs\n"}), true, false)
		n.serve(c)
	}
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	a := n.auditor()
	a.Run(context.Background())
	rep := a.Run(context.Background())
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(a)
	kept := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("heap held by the auditor after two audits of %d containers with a 250 KiB annotation each: %.1f MiB", containers, float64(kept)/(1<<20))
	if kept > 4<<20 {
		t.Errorf("the auditor holds %.1f MiB after auditing %d containers (%d MiB of annotation text): it keeps the tenants' annotations",
			float64(kept)/(1<<20), containers, containers*250>>10)
	}
	if rep.Checked != containers || len(rep.Unserved) != 0 {
		t.Errorf("checked %d, unserved %v; want %d served", rep.Checked, rep.Unserved, containers)
	}
	if len(rep.Unmatched) != containers {
		t.Errorf("%d unmatched annotations reported, want one per pod (%d)", len(rep.Unmatched), containers)
	} else if u := rep.Unmatched[0]; u.Annotation != annotations.Key+".nosuchcontainer" || u.Pod != "web000" {
		t.Errorf("unmatched %+v", u)
	}
}

// TestAuditConfigSizeLimit (issue 24, defect 3): a config.json larger
// than any runtime writes is not read whole; the audit says it could not
// read that container.
func TestAuditConfigSizeLimit(t *testing.T) {
	n := newNode(t)
	n.container("huge", crio("sb1", "web", "app", map[string]string{"pad": strings.Repeat("x", 17<<20), annotations.Key: "- cert_dir: /certs\n"}), false, false)
	rep := n.auditor().Run(context.Background())
	if len(rep.Errors) != 1 || !strings.Contains(rep.Errors[0], "huge") || !strings.Contains(rep.Errors[0], "larger than") {
		t.Errorf("errors %q, want one naming the container's oversized config.json", rep.Errors)
	}
}

// bigCRI is a CRI runtime service whose ListPodSandbox answers with every
// pod it has, or only the ready ones when the request asks so, as
// containerd does.
type bigCRI struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	pods []*runtimeapi.PodSandbox
}

func (s *bigCRI) ListPodSandbox(_ context.Context, req *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	var out []*runtimeapi.PodSandbox
	for _, p := range s.pods {
		if f := req.GetFilter().GetState(); f == nil || f.State == p.State {
			out = append(out, p)
		}
	}
	return &runtimeapi.ListPodSandboxResponse{Items: out}, nil
}

// serveCRI serves pods on a socket in n's directory for the audit to ask.
func serveCRI(n *node, pods []*runtimeapi.PodSandbox) {
	sock := filepath.Join(n.dir, "cri.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		n.t.Fatal(err)
	}
	// The server sends what it has: its limit is not the one under test.
	srv := grpc.NewServer(grpc.MaxSendMsgSize(64 << 20))
	runtimeapi.RegisterRuntimeServiceServer(srv, &bigCRI{pods: pods})
	go srv.Serve(l)
	n.t.Cleanup(srv.Stop)
	n.cri = []string{sock}
}

// bigPods are n pods in state st, each with a 250 KiB annotation (not an
// identity one: any tenant can write it).
func bigPods(n int, st runtimeapi.PodSandboxState) []*runtimeapi.PodSandbox {
	big := strings.Repeat("x", 250<<10)
	var out []*runtimeapi.PodSandbox
	for i := range n {
		out = append(out, &runtimeapi.PodSandbox{Id: fmt.Sprintf("big-%s-%d", st, i), State: st,
			Metadata:    &runtimeapi.PodSandboxMetadata{Name: fmt.Sprintf("big%d", i), Namespace: "tenant"},
			Annotations: map[string]string{"example.com/blob": big}})
	}
	return out
}

var ctrdApp = map[string]string{annotations.ContainerdContainerType: "container", ctrdSandboxID: "sb-web", annotations.ContainerdContainerName: "app"}

var webPod = &runtimeapi.PodSandbox{Id: "sb-web", State: runtimeapi.PodSandboxState_SANDBOX_READY,
	Metadata: &runtimeapi.PodSandboxMetadata{Name: "web", Namespace: "shop"}, Annotations: asks}

// TestAuditCRIBigSandboxes (issue 24, defect 4): other tenants' pods with
// large annotations (20 ready ones, 5 MB, past gRPC's default 4 MiB; 50
// stopped ones, which the audit does not need) do not blind the
// containerd audit: the pod whose annotation containerd dropped is still
// reported.
func TestAuditCRIBigSandboxes(t *testing.T) {
	n := newNode(t)
	serveCRI(n, slices.Concat(bigPods(20, runtimeapi.PodSandboxState_SANDBOX_READY), bigPods(50, runtimeapi.PodSandboxState_SANDBOX_NOTREADY), []*runtimeapi.PodSandbox{webPod}))
	n.container("app", ctrdApp, false, false)
	rep := n.auditor().Run(context.Background())
	if u := byID(rep)["app"]; u.Cause != CauseNRIPluginAbsent || u.Pod != "web" {
		t.Errorf("the container of a pod that asked: %+v; report: unserved %+v, errors %q", u, rep.Unserved, rep.Errors)
	}
	if len(rep.Errors) != 0 {
		t.Errorf("errors: %q", rep.Errors)
	}
}

// TestAuditCRIUnreadable (issue 24, defect 4): when the CRI cannot be
// read (here its answer is past any receive limit: 70 ready pods of
// 250 KiB), the audit does not report zero: every containerd container
// whose pod it could not read and whose spec does not say is reported
// with cause cri_unreadable, and the error is in the report.
func TestAuditCRIUnreadable(t *testing.T) {
	n := newNode(t)
	serveCRI(n, append(bigPods(70, runtimeapi.PodSandboxState_SANDBOX_READY), webPod))
	n.container("app", ctrdApp, false, false)
	served := n.container("served", map[string]string{annotations.ContainerdContainerType: "container", ctrdSandboxID: "sb-other", annotations.ContainerdContainerName: "app"}, false, false)
	n.serve(served)
	rep := n.auditor().Run(context.Background())
	u := byID(rep)["app"]
	if u.Cause != CauseCRIUnreadable || !strings.Contains(u.Detail, n.cri[0]) {
		t.Errorf("the container whose pod could not be read: %+v; report: unserved %+v, errors %q", u, rep.Unserved, rep.Errors)
	}
	if len(rep.Unserved) != 1 || rep.Checked != 2 {
		t.Errorf("unserved %+v, checked %d: want only app unserved, of 2 checked", rep.Unserved, rep.Checked)
	}
	if len(rep.Errors) != 1 || !strings.Contains(rep.Errors[0], "ListPodSandbox") {
		t.Errorf("errors %q, want the CRI's", rep.Errors)
	}
}
