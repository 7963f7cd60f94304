package audit

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
)

// BenchmarkAudit measures one audit of a node with n running containers
// that asked for an identity, each served (the usual case): runc state
// and config.json about the size CRI-O writes (a state.json of about 12
// KiB, a config.json of about 8 KiB). "cold" is the first audit (every
// file read and parsed); "warm" the ones after (state files unchanged:
// a stat, /proc/<pid>/stat and the record). BENCHMARKS.md reports it.
//
//	go test -run '^$' -bench Audit -benchmem ./internal/audit
func BenchmarkAudit(b *testing.B) {
	for _, n := range []int{110, 1000} {
		b.Run(fmt.Sprintf("%d/warm", n), func(b *testing.B) { benchAudit(b, n, true) })
		b.Run(fmt.Sprintf("%d/cold", n), func(b *testing.B) { benchAudit(b, n, false) })
	}
}

func benchAudit(b *testing.B, n int, warm bool) {
	nd := newNode(b)
	pad := strings.Repeat("x", 12<<10)
	nd.statePad = pad
	for i := range n {
		c := nd.container(fmt.Sprintf("c%04d", i), crio(fmt.Sprintf("sb%04d", i), "web", "app", map[string]string{
			annotations.Key: "- cert_dir: /certs\n", "io.kubernetes.cri-o.Labels": pad[:6<<10]}), true, false)
		nd.serve(c)
	}
	a := nd.auditor()
	if warm {
		a.Run(context.Background())
	}
	b.ResetTimer()
	for range b.N {
		if !warm {
			a = nd.auditor()
		}
		rep := a.Run(context.Background())
		if rep.Checked != n || len(rep.Unserved) != 0 {
			b.Fatalf("checked %d, unserved %d; want %d, 0", rep.Checked, len(rep.Unserved), n)
		}
	}
	b.StopTimer()
	// What the auditor keeps between audits (its caches).
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	runtime.KeepAlive(a)
	a = nil
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(int64(before.HeapAlloc)-int64(after.HeapAlloc))/1024, "KiB-kept")
}
