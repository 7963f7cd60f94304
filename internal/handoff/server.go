package handoff

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/process"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
)

// Handler delivers a handed-over container: proc is its process, taken
// from the pidfd. It returns the container's record, or the error that
// the hook prints in the container's failure line.
type Handler func(ctx context.Context, req Request, proc *process.Process) (statedir.Record, error)

// Server answers the hook's requests.
type Server struct {
	Handler Handler
	Log     *slog.Logger
	// MaxConcurrent bounds the requests served at once; the others wait
	// in the socket's backlog, within their hooks' timeouts.
	MaxConcurrent int
	// ReadTimeout bounds reading one request, so that a client that sends
	// nothing cannot hold a slot.
	ReadTimeout time.Duration
	// Settle, when set, runs after the handler's answer was sent (or
	// could not be), outside the request's slot, unless the server is
	// stopping. A hook that gave up waiting removes what was written
	// under its lock before the handler finished; Settle is where the
	// refresher removes what it wrote after that.
	Settle func(req Request)
}

// Listen binds the socket at path, root only (0600), replacing what a
// refresher that was killed left there. Closing the listener removes the
// socket only while it is still this listener's: a successor that has
// bound the path meanwhile (a rolling update) keeps it.
func Listen(path string) (*Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing the stale handoff socket: %w", err)
	}
	// The umask closes the window between bind and chmod.
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("handoff socket: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	st, err := os.Stat(path)
	if err == nil {
		err = os.Chmod(path, 0o600)
	}
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("handoff socket: %w", err)
	}
	return &Listener{UnixListener: ln, path: path, bound: st}, nil
}

// Listener is the handoff socket.
type Listener struct {
	*net.UnixListener
	path  string
	bound os.FileInfo
}

// Close stops listening, and removes the socket if it is still ours.
func (l *Listener) Close() error {
	err := l.UnixListener.Close()
	if st, serr := os.Stat(l.path); serr == nil && os.SameFile(st, l.bound) {
		os.Remove(l.path)
	}
	return err
}

// Serve answers requests on ln until ctx ends, then closes ln and waits
// for the requests in progress.
func (s *Server) Serve(ctx context.Context, ln *Listener) error {
	slots := make(chan struct{}, max(s.MaxConcurrent, 1))
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	for {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		conn, err := ln.AcceptUnix()
		if err != nil {
			<-slots
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			s.Log.Warn("handoff socket: accept", logkey.Error, err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		wg.Go(func() {
			req, handled := s.serve(ctx, conn)
			conn.Close()
			<-slots
			if handled && s.Settle != nil && ctx.Err() == nil {
				s.Settle(req)
			}
		})
	}
}

// serve answers one connection, and reports whether its request reached
// the handler.
func (s *Server) serve(ctx context.Context, conn *net.UnixConn) (req Request, handled bool) {
	var resp response
	req, proc, err := s.read(conn)
	if err == nil {
		var rec statedir.Record
		handled = true
		rec, err = s.Handler(ctx, req, proc)
		proc.Close()
		if err == nil {
			resp.Record = &rec
		}
		if err != nil && ctx.Err() != nil {
			// The refresher is stopping (a rolling update, a restart):
			// no answer, so that the hook delivers by itself
			// (ErrUnavailable) rather than refuse the container.
			s.Log.Info("stopping: handed-over container left to the hook", logkey.Container, req.ID)
			return req, handled
		}
	}
	if err != nil {
		resp.Error = err.Error()
		if req.ID != "" {
			s.Log.Warn("handed-over container not delivered", logkey.Container, req.ID, logkey.Error, err)
		} else {
			s.Log.Warn("handoff request refused", logkey.Error, err)
		}
	}
	data, err := json.Marshal(resp)
	if err == nil {
		conn.SetWriteDeadline(time.Now().Add(s.readTimeout()))
		_, err = conn.Write(data)
	}
	if err != nil {
		s.Log.Warn("handoff socket: answering", logkey.Container, req.ID, logkey.Error, err)
	}
	return req, handled
}

func (s *Server) readTimeout() time.Duration {
	if s.ReadTimeout > 0 {
		return s.ReadTimeout
	}
	return 5 * time.Second
}

// read checks the peer and reads its request and the pidfd that came with it.
func (s *Server) read(conn *net.UnixConn) (Request, *process.Process, error) {
	var req Request
	if err := checkPeer(conn); err != nil {
		// Read what was sent (its descriptors are dropped with it), so
		// that the client reads the refusal rather than a reset.
		conn.SetReadDeadline(time.Now().Add(s.readTimeout()))
		io.Copy(io.Discard, io.LimitReader(conn, MaxRequest))
		return req, nil, err
	}
	conn.SetReadDeadline(time.Now().Add(s.readTimeout()))
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return req, nil, fmt.Errorf("reading the request: %w", err)
	}
	fds, err := rights(oob[:oobn], flags)
	if err != nil {
		return req, nil, err
	}
	// A pidfd is taken over by process.FromPidfd; any other descriptor
	// sent along is closed here.
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	rest, err := io.ReadAll(io.LimitReader(conn, int64(MaxRequest+1-n)))
	if err != nil {
		closeAll()
		return req, nil, fmt.Errorf("reading the request: %w", err)
	}
	data := append(buf[:n], rest...)
	if len(data) > MaxRequest {
		closeAll()
		return req, nil, fmt.Errorf("request exceeds %d KiB", MaxRequest>>10)
	}
	if err := json.Unmarshal(data, &req); err != nil {
		closeAll()
		return Request{}, nil, fmt.Errorf("request: %w", err)
	}
	if len(fds) != 1 {
		closeAll()
		return req, nil, fmt.Errorf("request came with %d file descriptors; want the container's pidfd alone", len(fds))
	}
	proc, err := process.FromPidfd(fds[0])
	if err != nil {
		return req, nil, fmt.Errorf("container process: %w", err)
	}
	return req, proc, nil
}

// checkPeer refuses a client that is not root in the refresher's user
// namespace: the socket's mode says so already, and this holds even if a
// mount or a mode were wrong.
func checkPeer(conn *net.UnixConn) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if credErr != nil {
		return fmt.Errorf("reading the client's credentials: %w", credErr)
	}
	if cred.Uid != 0 {
		return fmt.Errorf("refused: uid %d (pid %d) is not root, and only root may hand over a container", cred.Uid, cred.Pid)
	}
	return nil
}

// rights returns the file descriptors of the message's SCM_RIGHTS.
func rights(oob []byte, flags int) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("request's control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		fds = append(fds, got...)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, errors.New("request came with too many file descriptors")
	}
	return fds, nil
}
