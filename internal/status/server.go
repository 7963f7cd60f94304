package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
)

// Server serves the refresher's endpoints: what the report (status.go)
// says, as /status, /healthz and /readyz, and the Prometheus registry's
// /metrics beside them.
type Server struct {
	log     *slog.Logger
	servers []*http.Server
	lns     []net.Listener
	socket  string
}

// Listen opens the unix socket (mode 0600) and, if address is not empty,
// the TCP address. The unix socket serves /metrics, /healthz, /readyz and
// /status; TCP leaves out /status, which names every container on the node.
// A stale socket file is replaced; a socket another refresher still
// answers on is an error.
func Listen(socket, address string, metrics http.Handler, report func() Report, log *slog.Logger) (*Server, error) {
	s := &Server{log: log, socket: socket}
	ln, err := listenUnix(socket)
	if err != nil {
		return nil, err
	}
	s.add(ln, handler(metrics, report, true))
	if address != "" {
		tln, err := net.Listen("tcp", address)
		if err != nil {
			s.close()
			return nil, fmt.Errorf("metrics address %s: %w", address, err)
		}
		s.add(tln, handler(metrics, report, false))
	}
	return s, nil
}

// Addrs returns the addresses listened on, the unix socket first.
func (s *Server) Addrs() []net.Addr {
	var out []net.Addr
	for _, ln := range s.lns {
		out = append(out, ln.Addr())
	}
	return out
}

func (s *Server) add(ln net.Listener, h http.Handler) {
	s.lns = append(s.lns, ln)
	s.servers = append(s.servers, &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second})
}

// Serve serves until ctx ends, then closes the listeners and removes the
// socket file.
func (s *Server) Serve(ctx context.Context) {
	for i, srv := range s.servers {
		go func() {
			if err := srv.Serve(s.lns[i]); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("metrics server", "address", s.lns[i].Addr().String(), logkey.Error, err)
			}
		}()
	}
	<-ctx.Done()
	s.close()
}

func (s *Server) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, srv := range s.servers {
		srv.Shutdown(ctx)
	}
	for _, ln := range s.lns {
		ln.Close()
	}
}

func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("metrics socket %s: %w", path, err)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("metrics socket %s: exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("metrics socket %s: another refresher is serving it: stop it first", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("metrics socket %s: removing the stale socket: %w", path, err)
		}
	}
	// Created 0600 from the start, not chmod'ed after: no moment in which
	// another user could connect.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("metrics socket %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)
	return ln, nil
}

func handler(metrics http.Handler, report func() Report, withStatus bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET "+PathMetrics, metrics)
	mux.HandleFunc("GET "+PathHealthz, func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET "+PathReadyz, func(w http.ResponseWriter, _ *http.Request) {
		ready, why := report().Ready()
		if !ready {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintln(w, why)
	})
	if withStatus {
		mux.HandleFunc("GET "+PathStatus, func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(report())
		})
	}
	return mux
}
