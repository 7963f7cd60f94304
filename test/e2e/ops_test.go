package e2e

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// metricsClient scrapes the refresher's unix socket as Prometheus would
// scrape a TCP target, and parses with Prometheus' own text parser.
type metricsClient struct {
	socket string
	http   *http.Client
}

func newMetricsClient(socket string) *metricsClient {
	return &metricsClient{socket: socket, http: &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}}
}

// scrape returns the metric families, or an error when the socket does
// not answer.
func (m *metricsClient) scrape() (map[string]*dto.MetricFamily, error) {
	resp, err := m.http.Get("http://refresher/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, errors.New(resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(resp.Body)
}

// value returns the value of the one series of name whose labels include
// labels (name=value pairs); ok is false when there is none.
func value(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
	for _, m := range f.GetMetric() {
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				found = found || (l.GetName() == labels[i] && l.GetValue() == labels[i+1])
			}
			match = match && found
		}
		if !match {
			continue
		}
		switch {
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Untyped != nil:
			return m.GetUntyped().GetValue(), true
		}
	}
	return 0, false
}

// waitMetric scrapes until cond holds for the scrape.
func (m *metricsClient) waitMetric(t *testing.T, d time.Duration, what string, cond func(map[string]*dto.MetricFamily) bool) map[string]*dto.MetricFamily {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		fams, err := m.scrape()
		if err == nil && cond(fams) {
			return fams
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s does not hold (scrape error %v)", d, what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// diskExpiry returns the earliest NotAfter of the SVIDs in every delivery
// directory of the state directory, read the way applications read them.
func diskExpiry(t *testing.T, stateDir string) (earliest time.Time, certs int) {
	t.Helper()
	dirs, _ := filepath.Glob(filepath.Join(stateDir, "containers", "*", "*"))
	for _, dir := range dirs {
		data, err := os.ReadFile(filepath.Join(dir, "svid.pem"))
		if err != nil {
			continue // removed meanwhile
		}
		b, _ := pem.Decode(data)
		if b == nil {
			t.Fatalf("%s/svid.pem holds no PEM", dir)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs++
		if earliest.IsZero() || c.NotAfter.Before(earliest) {
			earliest = c.NotAfter
		}
	}
	return earliest, certs
}

// refresherCmd runs `spiffe-oci-refresher args...` and returns its stdout,
// stderr and exit code.
func refresherCmd(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(refresherBin, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("%s %v: %v", refresherBin, args, err)
	}
	return out.String(), errb.String(), code
}

// statusLine returns the status command's line for container id.
func statusLine(t *testing.T, out, id string) []string {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) >= 5 && f[0] == id {
			return f
		}
	}
	t.Fatalf("status shows no line for container %s:\n%s", id, out)
	return nil
}

// certNotAfter is the NotAfter of container id's delivery 0 on disk.
func certNotAfter(t *testing.T, stateDir, id string) time.Time {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(stateDir, "containers", id, "0", "svid.pem"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c.NotAfter
}

// signal sends sig to the refresher.
func (r *refresher) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := r.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// waitLog waits until the refresher's log holds n lines containing sub.
func (r *refresher) waitLog(t *testing.T, d time.Duration, sub string, n int) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		log := readFile(r.log)
		if strings.Count(log, sub) >= n {
			return log
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s the refresher logged %q %d times, want %d:\n%s", d, sub, strings.Count(log, sub), n, log)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
