package audit

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"

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
