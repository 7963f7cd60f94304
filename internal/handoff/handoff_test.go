package handoff

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/annotations"
	"github.com/noderesource/spiffe-oci-hook/internal/files"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// serve starts a server with handler on a socket in a temp directory and
// returns the socket's path.
func serve(t *testing.T, handler Handler, maxConcurrent int) string {
	t.Helper()
	return serveIn(t, t.TempDir(), handler, maxConcurrent)
}

func serveIn(t *testing.T, dir string, handler Handler, maxConcurrent int) string {
	t.Helper()
	path := filepath.Join(dir, "handoff.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{Handler: handler, Log: slog.New(slog.DiscardHandler), MaxConcurrent: maxConcurrent, ReadTimeout: time.Second}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the socket is still there after Serve returned: %v", err)
		}
	})
	return path
}

func self(t *testing.T) *process.Process {
	t.Helper()
	p, err := process.Open(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

var request = Request{ID: "c1", Key: annotations.Key, Value: `[{"cert_dir": "/run/spiffe"}]`}

// TestDeliver: the request and the pidfd reach the handler, which sees
// the sender's process by its pidfd and answers with the record.
func TestDeliver(t *testing.T) {
	path := serve(t, func(ctx context.Context, req Request, proc *process.Process) (statedir.Record, error) {
		ds, err := req.Validate()
		if err != nil {
			return statedir.Record{}, err
		}
		return statedir.Record{ID: req.ID, PID: proc.PID, StartTime: proc.StartTime, Deliveries: []statedir.Delivery{{Delivery: ds[0]}}}, nil
	}, 1)
	me := self(t)
	rec, err := Deliver(context.Background(), path, request, me.FD())
	if err != nil {
		t.Fatal(err)
	}
	if rec.ID != "c1" || rec.PID != me.PID || rec.StartTime != me.StartTime || len(rec.Deliveries) != 1 || rec.Deliveries[0].CertDir != "/run/spiffe" {
		t.Fatalf("record %+v", rec)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v; want 0600", st.Mode(), err)
	}
}

// TestRefusals: what the refresher cannot trust is refused with a line
// the hook prints as is.
func TestRefusals(t *testing.T) {
	for _, tc := range []struct {
		name string
		req  Request
		want string
	}{
		{"container ID with a slash", Request{ID: "../c", Key: request.Key, Value: request.Value}, "container id"},
		{"not an identity annotation", Request{ID: "c1", Key: "io.example/other", Value: request.Value}, "not an identity annotation"},
		{"annotation that does not parse", Request{ID: "c1", Key: request.Key, Value: `[{"cert_dir": "relative"}]`}, "cert_dir"},
		{"negative owner", Request{ID: "c1", Key: request.Key, Value: request.Value, Owner: files.Owner{UID: -1}}, "not a host user"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			called := false
			path := serve(t, func(ctx context.Context, req Request, proc *process.Process) (statedir.Record, error) {
				called = true
				if _, err := req.Validate(); err != nil {
					return statedir.Record{}, err
				}
				return statedir.Record{ID: req.ID}, nil
			}, 1)
			_, err := Deliver(context.Background(), path, tc.req, self(t).FD())
			if err == nil || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Deliver = %v; want a refusal naming %q", err, tc.want)
			}
			if !called {
				t.Fatal("the handler was not asked")
			}
		})
	}
}

// TestNotAPidfd: a request whose file descriptor is not a pidfd never
// reaches the handler.
func TestNotAPidfd(t *testing.T) {
	path := serve(t, func(context.Context, Request, *process.Process) (statedir.Record, error) {
		t.Error("the handler was asked without a pidfd")
		return statedir.Record{}, nil
	}, 1)
	f, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = Deliver(context.Background(), path, request, int(f.Fd()))
	if err == nil || !strings.Contains(err.Error(), "not a pidfd") {
		t.Fatalf("Deliver = %v; want not a pidfd", err)
	}
}

// TestUnavailable: no refresher listening, a stale socket a killed one
// left, and a refresher that dies in the middle of the request all wrap
// ErrUnavailable, which lets the hook ask the agent itself.
func TestUnavailable(t *testing.T) {
	dir := t.TempDir()
	me := self(t)
	if _, err := Deliver(context.Background(), filepath.Join(dir, "none.sock"), request, me.FD()); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("no socket: %v; want ErrUnavailable", err)
	}

	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if _, err := Deliver(context.Background(), stale, request, me.FD()); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("stale socket: %v; want ErrUnavailable", err)
	}

	// A refresher that reads the request and dies before it answers.
	dying := filepath.Join(dir, "dying.sock")
	ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: dying, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.ReadAll(c)
		c.Close()
	}()
	if _, err := Deliver(context.Background(), dying, request, me.FD()); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("refresher gone mid-request: %v; want ErrUnavailable", err)
	}
}

// TestStopping: a refresher that stops while it serves a request closes
// the connection without an answer, so that the hook delivers by itself
// instead of refusing the container.
func TestStopping(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handoff.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	asked := make(chan struct{})
	s := &Server{Handler: func(ctx context.Context, req Request, proc *process.Process) (statedir.Record, error) {
		close(asked)
		<-ctx.Done()
		return statedir.Record{}, ctx.Err()
	}, Log: slog.New(slog.DiscardHandler), MaxConcurrent: 1}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	go func() { <-asked; cancel() }()
	_, err = Deliver(context.Background(), path, request, self(t).FD())
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Deliver to a stopping refresher = %v; want ErrUnavailable", err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestTimeout: a refresher that does not answer within the hook's time
// is a timeout, not ErrUnavailable: it may still be writing, so the hook
// must not deliver over its head.
func TestTimeout(t *testing.T) {
	release := make(chan struct{})
	path := serve(t, func(ctx context.Context, req Request, proc *process.Process) (statedir.Record, error) {
		<-release
		return statedir.Record{}, errors.New("too late")
	}, 1)
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := Deliver(ctx, path, request, self(t).FD())
	if err == nil || errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Deliver = %v; want a deadline, not ErrUnavailable", err)
	}
}

// TestSettle: Settle runs once the answer is out, whether the client took
// it or had given up waiting, and not before: the refresher's clean-up of
// a given-up container must not race the handler's writing.
func TestSettle(t *testing.T) {
	release := make(chan struct{})
	settled := make(chan string, 2)
	path := filepath.Join(t.TempDir(), "handoff.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{Handler: func(ctx context.Context, req Request, proc *process.Process) (statedir.Record, error) {
		if req.ID == "given-up" {
			<-release
		}
		return statedir.Record{ID: req.ID}, nil
	}, Settle: func(req Request) { settled <- req.ID }, Log: slog.New(slog.DiscardHandler), MaxConcurrent: 2}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	if _, err := Deliver(context.Background(), path, Request{ID: "answered", Key: request.Key, Value: request.Value}, self(t).FD()); err != nil {
		t.Fatal(err)
	}
	if id := <-settled; id != "answered" {
		t.Fatalf("settled %q; want answered", id)
	}

	short, stop := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer stop()
	if _, err := Deliver(short, path, Request{ID: "given-up", Key: request.Key, Value: request.Value}, self(t).FD()); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Deliver = %v; want the client's deadline", err)
	}
	select {
	case id := <-settled:
		t.Fatalf("settled %q while its handler was still working", id)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	select {
	case id := <-settled:
		if id != "given-up" {
			t.Fatalf("settled %q; want given-up", id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a request whose client gave up was never settled")
	}
}

// TestNonRootRefused: a client that is not root is refused, by the
// socket's mode and, were that wrong, by its peer credentials.
func TestNonRootRefused(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run a client as another user")
	}
	// A directory nobody may enter, holding the socket and a copy of this
	// test binary, which is the client nobody runs.
	dir, err := os.MkdirTemp("/tmp", "handoff-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	bin, err := os.ReadFile(os.Args[0])
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "client"), bin, 0o755)
	}
	if err != nil {
		t.Fatal(err)
	}
	var asked atomic.Bool
	path := serveIn(t, dir, func(context.Context, Request, *process.Process) (statedir.Record, error) {
		asked.Store(true)
		return statedir.Record{ID: "c1"}, nil
	}, 1)
	connectAsNobody := func() string {
		t.Helper()
		cmd := exec.Command(filepath.Join(dir, "client"))
		cmd.Env = append(os.Environ(), "HANDOFF_HELPER_SOCKET="+path)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, _ := cmd.CombinedOutput()
		return string(out)
	}
	if out := connectAsNobody(); !strings.Contains(out, "permission denied") {
		t.Fatalf("nobody connecting to the 0600 socket: %s; want permission denied", out)
	}
	// Were the mode wrong, the peer check still refuses.
	os.Chmod(path, 0o666)
	if out := connectAsNobody(); !strings.Contains(out, "is not root") {
		t.Fatalf("nobody connecting to a 0666 socket: %s; want refused as not root", out)
	}
	if asked.Load() {
		t.Fatal("the handler was asked for a client that is not root")
	}
}

// TestMain runs, in place of the tests, TestNonRootRefused's client as
// another user when HANDOFF_HELPER_SOCKET names the socket.
func TestMain(m *testing.M) {
	if path := os.Getenv("HANDOFF_HELPER_SOCKET"); path != "" {
		p, err := process.Open(os.Getpid())
		if err == nil {
			_, err = Deliver(context.Background(), path, request, p.FD())
		}
		fmt.Printf("RESULT: %v\n", err)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestBounds: a request larger than MaxRequest is refused before it is
// read whole, and no more than MaxConcurrent requests are served at once.
func TestBounds(t *testing.T) {
	var inFlight, most atomic.Int32
	release := make(chan struct{})
	path := serve(t, func(context.Context, Request, *process.Process) (statedir.Record, error) {
		n := inFlight.Add(1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		<-release
		inFlight.Add(-1)
		return statedir.Record{ID: "c1"}, nil
	}, 2)
	me := self(t)
	big := request
	big.Value = strings.Repeat(" ", MaxRequest)
	if _, err := Deliver(context.Background(), path, big, me.FD()); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("oversized request: %v; want refused", err)
	}
	errs := make(chan error, 5)
	for range 5 {
		go func() {
			_, err := Deliver(context.Background(), path, request, me.FD())
			errs <- err
		}()
	}
	time.Sleep(300 * time.Millisecond)
	close(release)
	for range 5 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if m := most.Load(); m > 2 {
		t.Fatalf("%d requests served at once; MaxConcurrent is 2", m)
	}
}

// TestOversizedOnTheWire: a client that writes past MaxRequest (not this
// package's client, which refuses first) is refused by the server.
func TestOversizedOnTheWire(t *testing.T) {
	path := serve(t, func(context.Context, Request, *process.Process) (statedir.Record, error) {
		t.Error("the handler was asked with an oversized request")
		return statedir.Record{}, nil
	}, 1)
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go func() {
		c.Write([]byte(strings.Repeat("x", MaxRequest+4096)))
		c.(*net.UnixConn).CloseWrite()
	}()
	out, _ := io.ReadAll(c)
	if !strings.Contains(string(out), "exceeds") {
		t.Fatalf("answer %q; want the request refused as too large", out)
	}
}
