package daemon

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
)

// fakeReloads is a reloads whose load, apply and counted are recorded.
type fakeReloads struct {
	mu      sync.Mutex
	loadErr error
	apply   error
	applied []config.Config
	counted []error
	levels  int
	log     bytes.Buffer
}

func (f *fakeReloads) loop() reloads {
	level := new(slog.LevelVar)
	return reloads{
		load: func() (config.Config, error) {
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.loadErr != nil {
				return config.Config{}, f.loadErr
			}
			return config.Config{AgentAdminSocket: "/run/next/admin.sock"}, nil
		},
		apply: func(c config.Config) error {
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.apply != nil {
				return f.apply
			}
			f.applied = append(f.applied, c)
			return nil
		},
		counted:  func(err error) { f.mu.Lock(); f.counted = append(f.counted, err); f.mu.Unlock() },
		setLevel: func(config.Config) { f.mu.Lock(); f.levels++; f.mu.Unlock() },
		level:    level,
		log:      slog.New(slog.NewTextHandler(&lockedWriter{mu: &f.mu, w: &f.log}, nil)),
		path:     "/etc/spiffe-oci-hook/config.yaml",
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func TestReloadApplies(t *testing.T) {
	f := &fakeReloads{}
	if err := f.loop().reload(); err != nil {
		t.Fatal(err)
	}
	if len(f.applied) != 1 || f.applied[0].AgentAdminSocket != "/run/next/admin.sock" {
		t.Errorf("applied %+v, want the configuration just loaded", f.applied)
	}
	if len(f.counted) != 1 || f.counted[0] != nil || f.levels != 1 {
		t.Errorf("counted %v, levels set %d: want one success, the level set once", f.counted, f.levels)
	}
	line := f.log.String()
	for _, want := range []string{"configuration reloaded", "config=/etc/spiffe-oci-hook/config.yaml", "agent_socket=/run/next/admin.sock"} {
		if !strings.Contains(line, want) {
			t.Errorf("log %q lacks %q", line, want)
		}
	}
}

// A configuration that does not load, or that the refresher refuses, is
// refused with one line; the one in force stays (nothing applied, the
// level untouched) and the refusal is counted.
func TestReloadRefuses(t *testing.T) {
	for name, f := range map[string]*fakeReloads{
		"does not load":        {loadErr: errors.New("config.yaml: line 3: bad")},
		"refused by refresher": {apply: errors.New("state_dir cannot change without a restart")},
	} {
		t.Run(name, func(t *testing.T) {
			err := f.loop().reload()
			if err == nil {
				t.Fatal("reload succeeded")
			}
			if len(f.applied) != 0 || f.levels != 0 {
				t.Errorf("applied %v, levels set %d: want nothing changed", f.applied, f.levels)
			}
			if len(f.counted) != 1 || f.counted[0] == nil {
				t.Errorf("counted %v, want one refusal", f.counted)
			}
			lines := strings.Split(strings.TrimSpace(f.log.String()), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], "configuration reload refused; the running configuration stays in force") || !strings.Contains(lines[0], err.Error()) {
				t.Errorf("log %q: want one line that says the reload was refused and why", f.log.String())
			}
		})
	}
}

// run reloads once per signal, and stops when its context ends.
func TestReloadRun(t *testing.T) {
	f := &fakeReloads{}
	hup := make(chan os.Signal)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.loop().run(ctx, hup); close(done) }()
	for range 3 {
		hup <- syscall.SIGHUP
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		f.mu.Lock()
		n := len(f.applied)
		f.mu.Unlock()
		if n == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d reloads after 3 signals", n)
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("run did not return after its context ended")
	}
}
