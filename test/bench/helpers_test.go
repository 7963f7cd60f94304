package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/test/testhelp"
)

// Helpers.

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	writeFileMode(t, path, []byte(content), 0o600)
}

func writeFileMode(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
}

// poll waits for a condition every 5 ms: the benchmarks time some of
// what they wait for (start until every container is rewritten), and a
// coarser poll would add to those numbers.
var poll = testhelp.Poll{Every: 5 * time.Millisecond}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func envInts(name string, def []int) []int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	var out []int
	for _, f := range strings.Split(v, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	return out
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

var _ = runtime.Version

// goMemory reads where the refresher's memory goes from its own metrics
// (the Go runtime's collector), over its unix socket.
func goMemory(socket string) string {
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}}
	resp, err := c.Get("http://refresher/metrics")
	if err != nil {
		return "metrics: " + err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var out []string
	for _, line := range strings.Split(string(body), "\n") {
		for _, name := range []string{"go_goroutines", "go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes", "go_memstats_sys_bytes", "go_threads"} {
			if v, ok := strings.CutPrefix(line, name+" "); ok {
				f, _ := strconv.ParseFloat(v, 64)
				if strings.HasSuffix(name, "_bytes") {
					out = append(out, fmt.Sprintf("%s %.1f MiB", strings.TrimPrefix(strings.TrimSuffix(name, "_bytes"), "go_memstats_"), f/(1<<20)))
				} else {
					out = append(out, fmt.Sprintf("%s %.0f", strings.TrimPrefix(name, "go_"), f))
				}
			}
		}
	}
	return strings.Join(out, ", ")
}

// markedSections returns every <!-- begin NAME --> … <!-- end NAME -->
// block of doc, in order, each preceded by a blank line.
func markedSections(doc string) string {
	var out strings.Builder
	for {
		i := strings.Index(doc, "<!-- begin ")
		if i < 0 {
			return out.String()
		}
		nameEnd := strings.Index(doc[i:], " -->")
		if nameEnd < 0 {
			return out.String()
		}
		name := doc[i+len("<!-- begin ") : i+nameEnd]
		end := "<!-- end " + name + " -->\n"
		j := strings.Index(doc[i:], end)
		if j < 0 {
			return out.String()
		}
		out.WriteString("\n" + doc[i:i+j+len(end)])
		doc = doc[i+j+len(end):]
	}
}
