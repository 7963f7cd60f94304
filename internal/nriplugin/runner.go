package nriplugin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"

	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
)

// Default bounds of the wait between connection attempts. Dialling a unix
// socket that is not there costs nothing, and every second without the
// plugin is a second in which containerd creates annotated containers
// without the hook, so the wait stays short.
const (
	DefaultMinRetry = 100 * time.Millisecond
	DefaultMaxRetry = 2 * time.Second
	// DefaultStartTimeout bounds one registration. NRI's stub waits for
	// the runtime's Configure call without a timeout of its own; a runtime
	// that accepts the connection and never configures the plugin must not
	// hold it forever.
	DefaultStartTimeout = 30 * time.Second
)

// Runner keeps a Plugin registered with the runtime's NRI socket for as
// long as its context lives. When the runtime goes away (containerd
// restarts), NRI's stub stops; Runner then connects a new stub as soon as
// the socket answers again, so that containers created after the restart
// get the hook.
type Runner struct {
	Plugin *Plugin
	Socket string // the runtime's NRI socket
	Name   string // plugin name, which the default validator's required-plugins lists
	Index  string // plugin index: its order among plugins
	Log    *slog.Logger
	// MinRetry and MaxRetry bound the wait between connection attempts:
	// it starts at MinRetry and doubles up to MaxRetry (zero: defaults).
	MinRetry, MaxRetry time.Duration
	// StartTimeout bounds one registration (zero: DefaultStartTimeout).
	StartTimeout time.Duration
}

// Run connects, and reconnects after every disconnection, until ctx is
// done; then it disconnects and returns nil. It logs once per change of
// state: connected, connection lost, cannot connect. It returns an error
// only for a configuration no retry can fix (a bad name or index).
func (r *Runner) Run(ctx context.Context) error {
	if err := api.CheckPluginIndex(r.Index); err != nil {
		return err
	}
	minRetry, maxRetry := r.MinRetry, r.MaxRetry
	if minRetry <= 0 {
		minRetry = DefaultMinRetry
	}
	if maxRetry < minRetry {
		maxRetry = max(DefaultMaxRetry, minRetry)
	}
	wait := minRetry
	down := false // a failure has been logged and nothing connected since
	for {
		connected, err := r.session(ctx)
		var fatal *configError
		if errors.As(err, &fatal) {
			return fatal.err
		}
		if ctx.Err() != nil {
			return nil
		}
		switch {
		case connected:
			r.Log.Warn("lost the connection to the NRI runtime; containers created until it is back get no hook; reconnecting", logkey.NRISocket, r.Socket, logkey.Error, err)
			wait, down = minRetry, true
		case !down:
			r.Log.Warn("cannot register with the NRI runtime; retrying until it answers", logkey.NRISocket, r.Socket, logkey.Error, err)
			down = true
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, maxRetry)
	}
}

// configError marks an error that retrying cannot fix.
type configError struct{ err error }

func (e *configError) Error() string { return e.err.Error() }

// session runs one NRI stub: it connects, registers, and waits until the
// connection closes (connected, with the reason) or ctx is done. NRI's
// stub never looks at its context once registered, so on ctx.Done the
// stub is stopped here.
func (r *Runner) session(ctx context.Context) (connected bool, err error) {
	closed := make(chan struct{})
	var closeOnce sync.Once
	var mu sync.Mutex
	var conn net.Conn
	p := &configured{Plugin: r.Plugin}
	s, err := stub.New(p,
		stub.WithPluginName(r.Name), stub.WithPluginIdx(r.Index), stub.WithSocketPath(r.Socket),
		stub.WithOnClose(func() { closeOnce.Do(func() { close(closed) }) }),
		stub.WithDialer(func(path string) (net.Conn, error) {
			c, err := net.Dial("unix", path)
			mu.Lock()
			conn = c
			mu.Unlock()
			return c, err
		}))
	if err != nil {
		return false, &configError{fmt.Errorf("creating the NRI plugin: %w", err)}
	}
	started := make(chan error, 1)
	go func() { started <- s.Start(ctx) }()
	// abandon gives up on a stub that is still starting: Stop would wait
	// for Start, which holds the stub's lock until the runtime configures
	// the plugin. Closing the connection makes Start fail, or leaves it
	// waiting on a runtime that will never configure it; if it succeeds
	// all the same, the stub is stopped then.
	abandon := func() {
		mu.Lock()
		if conn != nil {
			conn.Close()
		}
		mu.Unlock()
		go func() {
			if err := <-started; err == nil {
				s.Stop()
			}
		}()
	}
	timeout := r.StartTimeout
	if timeout <= 0 {
		timeout = DefaultStartTimeout
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case err := <-started:
		if err != nil {
			return false, err
		}
	case <-ctx.Done():
		abandon()
		return false, nil
	case <-timer.C:
		abandon()
		return false, fmt.Errorf("the runtime accepted the connection but did not configure the plugin within %s", timeout)
	}
	r.Log.Info("registered with the NRI runtime", logkey.NRISocket, r.Socket, "runtime", p.runtime, "runtime_version", p.version, "plugin", r.Index+"-"+r.Name)

	select {
	case <-closed:
		s.Stop()
		return true, errors.New("the runtime closed the connection")
	case <-ctx.Done():
		s.Stop()
		return true, nil
	}
}

// configured is the Plugin as one stub sees it: it also learns which
// runtime configured it, for the log line.
type configured struct {
	*Plugin
	runtime, version string
}

// Configure implements stub.ConfigureInterface. A zero event mask keeps
// the events the plugin's methods handle.
func (p *configured) Configure(_ context.Context, _, runtime, version string) (api.EventMask, error) {
	p.runtime, p.version = runtime, version
	return 0, nil
}
