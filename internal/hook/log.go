package hook

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"log/syslog"
	"strconv"
	"strings"
	"sync"
	"unicode"

	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
)

// program starts every line on stderr, and tags every line in syslog.
const program = "spiffe-oci-hook"

// NewLogger returns the hook's logger and a func that releases it. Each
// record is one line, written to stderr, which the runtime shows when the
// hook fails, and to syslog (journald) when there is one, because runtimes
// drop a successful hook's output. Syslog is opened at the first line, once
// for the process: a hook that has nothing to say never dials it. Without
// syslog the lines go to stderr alone. An info line (the hook running
// spiffe-oci-hook-direct as no refresher answered) goes to syslog alone:
// stderr holds the one line that says why a container was refused.
//
// A line is not slog's text format but the one that the runtime's error,
// docs/troubleshooting.md and the tests quote:
//
//	spiffe-oci-hook: container <container>: <message>: <error>
//
// where logkey.Container and logkey.Error are the record's attributes of
// those keys (each part only when present), and any other attribute
// follows as " key=value". Syslog gets the line without the program name,
// which is its tag, at the severity of the record's level.
func NewLogger(stderr io.Writer) (*slog.Logger, func()) {
	s := &sink{stderr: stderr, open: dialSyslog}
	return slog.New(&lineHandler{sink: s}), s.close
}

// syslogWriter is what the handler uses of a *syslog.Writer.
type syslogWriter interface {
	Err(string) error
	Warning(string) error
	Info(string) error
	Debug(string) error
	Close() error
}

func dialSyslog() (syslogWriter, error) {
	w, err := syslog.New(syslog.LOG_WARNING|syslog.LOG_DAEMON, program)
	if err != nil {
		return nil, err // not a nil *syslog.Writer inside the interface
	}
	return w, nil
}

// sink is where a logger's lines go; the handlers derived by With share it.
type sink struct {
	stderr io.Writer
	open   func() (syslogWriter, error)

	mu     sync.Mutex
	opened bool         // open was called
	syslog syslogWriter // nil when open failed
}

func (s *sink) write(level slog.Level, line string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if level >= slog.LevelWarn {
		fmt.Fprintln(s.stderr, program+": "+line)
	}
	if !s.opened {
		s.opened = true
		if w, err := s.open(); err == nil {
			s.syslog = w
		}
	}
	if s.syslog == nil {
		return
	}
	switch {
	case level >= slog.LevelError:
		s.syslog.Err(line)
	case level >= slog.LevelWarn:
		s.syslog.Warning(line)
	case level >= slog.LevelInfo:
		s.syslog.Info(line)
	default:
		s.syslog.Debug(line)
	}
}

func (s *sink) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.syslog != nil {
		s.syslog.Close()
		s.syslog = nil
	}
}

// lineHandler is the slog.Handler of NewLogger.
type lineHandler struct {
	sink  *sink
	attrs []slog.Attr // from WithAttrs, keys qualified by their groups
	group string      // the groups of WithGroup, as a "g." key prefix
}

// Enabled drops debug lines: the hook has no log level to set, and what it
// says is for operators.
func (h *lineHandler) Enabled(_ context.Context, level slog.Level) bool {
	return level >= slog.LevelInfo
}

func (h *lineHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append(append([]slog.Attr(nil), h.attrs...), qualify(h.group, as)...)
	return &c
}

func (h *lineHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := *h
	c.group += name + "."
	return &c
}

func (h *lineHandler) Handle(_ context.Context, r slog.Record) error {
	attrs := h.attrs
	r.Attrs(func(a slog.Attr) bool {
		attrs = append(attrs, qualify(h.group, []slog.Attr{a})...)
		return true
	})
	h.sink.write(r.Level, formatLine(r.Message, attrs))
	return nil
}

// qualify resolves as, drops the empty ones and flattens groups into keys
// prefixed with the group names, as slog's text handler does.
func qualify(prefix string, as []slog.Attr) []slog.Attr {
	var out []slog.Attr
	for _, a := range as {
		a.Value = a.Value.Resolve()
		if a.Equal(slog.Attr{}) {
			continue
		}
		if a.Value.Kind() == slog.KindGroup {
			p := prefix
			if a.Key != "" {
				p += a.Key + "."
			}
			out = append(out, qualify(p, a.Value.Group())...)
			continue
		}
		a.Key = prefix + a.Key
		out = append(out, a)
	}
	return out
}

// formatLine is a record's line without the program name (NewLogger).
func formatLine(msg string, attrs []slog.Attr) string {
	var parts, rest []string
	var container, cause string
	for _, a := range attrs {
		switch a.Key {
		case logkey.Container:
			container = a.Value.String()
		case logkey.Error:
			cause = a.Value.String()
		default:
			rest = append(rest, a.Key+"="+quoteIfNeeded(a.Value.String()))
		}
	}
	if container != "" {
		parts = append(parts, "container "+container)
	}
	if msg != "" {
		parts = append(parts, msg)
	}
	if cause != "" {
		parts = append(parts, cause)
	}
	line := strings.Join(parts, ": ")
	for _, kv := range rest {
		if line != "" {
			line += " "
		}
		line += kv
	}
	return line
}

// quoteIfNeeded quotes a value that would not read as one word.
func quoteIfNeeded(s string) string {
	if s == "" || strings.ContainsFunc(s, func(r rune) bool {
		return unicode.IsSpace(r) || r == '"' || r == '=' || !unicode.IsPrint(r)
	}) {
		return strconv.Quote(s)
	}
	return s
}
