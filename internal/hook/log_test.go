package hook

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/noderesource/spiffe-oci-hook/internal/deliver"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
)

// fakeSyslog records what the handler sends to syslog, by severity.
type fakeSyslog struct {
	lines  []string
	closed bool
}

func (f *fakeSyslog) Err(s string) error     { f.lines = append(f.lines, "err "+s); return nil }
func (f *fakeSyslog) Warning(s string) error { f.lines = append(f.lines, "warning "+s); return nil }
func (f *fakeSyslog) Info(s string) error    { f.lines = append(f.lines, "info "+s); return nil }
func (f *fakeSyslog) Debug(s string) error   { f.lines = append(f.lines, "debug "+s); return nil }
func (f *fakeSyslog) Close() error           { f.closed = true; return nil }

// testLogger is NewLogger with syslog replaced by open.
func testLogger(open func() (syslogWriter, error)) (*slog.Logger, *bytes.Buffer, func()) {
	var stderr bytes.Buffer
	s := &sink{stderr: &stderr, open: open}
	return slog.New(&lineHandler{sink: s}), &stderr, s.close
}

// TestLogLine: the lines keep the format the runtime's error,
// docs/troubleshooting.md and the e2e tests quote: the program, the
// container, the message, the error, in that order and each only when
// present.
func TestLogLine(t *testing.T) {
	cause := errors.New("record: open /run/x: no such file or directory")
	for _, tc := range []struct {
		name string
		log  func(*slog.Logger)
		want string
	}{
		{"message, container and error", func(l *slog.Logger) {
			l.Warn("poststop", logkey.Container, "ctr1", logkey.Error, cause)
		}, "spiffe-oci-hook: container ctr1: poststop: record: open /run/x: no such file or directory"},
		{"message as the error's text", func(l *slog.Logger) {
			l.Warn(cause.Error()+"; starting it WITHOUT an identity (failure_policy: fail-open)", logkey.Container, "ctr1")
		}, "spiffe-oci-hook: container ctr1: record: open /run/x: no such file or directory; starting it WITHOUT an identity (failure_policy: fail-open)"},
		{"attributes in any order", func(l *slog.Logger) {
			l.Warn("recording the fail-open start for the refresher's audit", logkey.Error, cause, logkey.Container, "ctr1")
		}, "spiffe-oci-hook: container ctr1: recording the fail-open start for the refresher's audit: record: open /run/x: no such file or directory"},
		{"container from With", func(l *slog.Logger) {
			l.With(logkey.Container, "ctr1").Warn("poststop", logkey.Error, cause)
		}, "spiffe-oci-hook: container ctr1: poststop: record: open /run/x: no such file or directory"},
		{"no container", func(l *slog.Logger) {
			l.Warn("poststop")
		}, "spiffe-oci-hook: poststop"},
		{"other attributes follow as key=value", func(l *slog.Logger) {
			l.WithGroup("g").Warn("note", logkey.Container, "ctr1", logkey.PID, 42, "why", "two words")
		}, `spiffe-oci-hook: note g.container=ctr1 g.pid=42 g.why="two words"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log, stderr, _ := testLogger(func() (syslogWriter, error) { return nil, errors.New("no syslog") })
			tc.log(log)
			if got := stderr.String(); got != tc.want+"\n" {
				t.Errorf("got  %q\nwant %q", got, tc.want+"\n")
			}
		})
	}
}

// TestLogSyslog: syslog is opened at the first line and only then, once
// for the process, and gets each line without the program name (its tag)
// at the record's severity; stderr gets the warnings and errors, the
// lines that say why a container was refused; without syslog, stderr
// still gets every one of those.
func TestLogSyslog(t *testing.T) {
	fake := &fakeSyslog{}
	opened := 0
	log, stderr, closeLog := testLogger(func() (syslogWriter, error) { opened++; return fake, nil })
	if opened != 0 {
		t.Fatal("syslog opened before any line")
	}
	log.Warn("first", logkey.Container, "ctr1")
	log.Error("second", logkey.Container, "ctr1")
	log.Info("third")
	log.Debug("dropped")
	closeLog()
	if opened != 1 {
		t.Errorf("syslog opened %d times for three lines, want once", opened)
	}
	if want := []string{"warning container ctr1: first", "err container ctr1: second", "info third"}; fmt.Sprint(fake.lines) != fmt.Sprint(want) {
		t.Errorf("syslog got %q, want %q", fake.lines, want)
	}
	if !fake.closed {
		t.Error("syslog not closed")
	}
	if got := strings.Count(stderr.String(), "\n"); got != 2 || strings.Contains(stderr.String(), "third") {
		t.Errorf("stderr got %d lines, want the warning and the error:\n%s", got, stderr)
	}

	opened = 0
	log, stderr, _ = testLogger(func() (syslogWriter, error) { opened++; return nil, errors.New("no syslog") })
	log.Warn("first")
	log.Warn("second")
	if opened != 1 || stderr.String() != "spiffe-oci-hook: first\nspiffe-oci-hook: second\n" {
		t.Errorf("without syslog: %d opens, stderr %q; want one try and both lines", opened, stderr)
	}
}

// TestSeveralSVIDsWarning: the hook's warning that the agent returned
// several SVIDs for the pid reads as it always has (docs/troubleshooting.md
// quotes it), and the container is still served.
func TestSeveralSVIDsWarning(t *testing.T) {
	n := newFakeNode(t)
	pid := n.req.State.Pid
	a, b := spiffeid.RequireFromString("spiffe://example.org/a"), spiffeid.RequireFromString("spiffe://example.org/b")
	n.fake.Set(pid, a, b)
	log, stderr, _ := testLogger(func() (syslogWriter, error) { return nil, errors.New("no syslog") })
	if err := directHook(n.cfg, func(d *deliver.Deliverer) { d.Log = log }).Create(context.Background(), n.req); err != nil {
		t.Fatal(err)
	}
	// The format the hook printed before it had a logger.
	want := "spiffe-oci-hook: " + fmt.Sprintf("container %s: the agent returned %d SVIDs for pid %d (%s); delivering the first unless a delivery names spiffe_id. An entry whose only selector is unix:uid:0 matches every container at creation time.",
		n.req.State.ID, 2, pid, a.String()+", "+b.String()) + "\n"
	if got := stderr.String(); got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}
