// Package benchmd is what every benchmark of make bench shares: the switch
// that runs them, and the writer of their sections of BENCHMARKS.md.
package benchmd

import (
	"fmt"
	"os"
	"path/filepath"
	goruntime "runtime"
	"strings"
	"testing"
)

// On skips t unless make bench runs it (SPIFFE_OCI_BENCH set): no
// benchmark runs in make test, whose skip list names this line.
func On(t testing.TB) {
	t.Helper()
	if os.Getenv("SPIFFE_OCI_BENCH") == "" {
		t.Skip("benchmarks: run `make bench` (sets SPIFFE_OCI_BENCH=1)")
	}
}

// Path is the file sections go to: BENCH_OUT if set ("-" for none), else
// root's BENCHMARKS.md.
func Path(root string) string {
	if p := os.Getenv("BENCH_OUT"); p != "" {
		return p
	}
	return filepath.Join(root, "BENCHMARKS.md")
}

// WriteSection puts md between <!-- begin name --> and <!-- end name -->
// in Path(root), appending the section if the file has none, so that a
// run of one benchmark replaces only its own section. The machine is
// shared while some runs happen: the section ends with how busy it was.
// It returns the path written, or "" for BENCH_OUT=-.
func WriteSection(root, name, md string) (string, error) {
	path := Path(root)
	if path == "-" {
		return "", nil
	}
	begin, end := "<!-- begin "+name+" -->\n", "<!-- end "+name+" -->\n"
	data, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return "", err
	}
	doc := string(data)
	load, _ := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(load)); len(f) >= 3 {
		md = strings.TrimRight(md, "\n") + fmt.Sprintf("\n\nLoad average (1, 5, 15 min) when this section was written: %s, on %d CPUs.\n", strings.Join(f[:3], ", "), goruntime.NumCPU())
	}
	block := begin + md + end
	if i, j := strings.Index(doc, begin), strings.Index(doc, end); i >= 0 && j > i {
		doc = doc[:i] + block + doc[j+len(end):]
	} else {
		if doc != "" && !strings.HasSuffix(doc, "\n\n") {
			doc = strings.TrimRight(doc, "\n") + "\n\n"
		}
		doc += block
	}
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		return "", fmt.Errorf("writing section %q of %s: %w", name, path, err)
	}
	return path, nil
}
