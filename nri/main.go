// Command spiffe-oci-nri is an NRI plugin for containerd: it passes a pod's
// identity annotation to its containers and injects spiffe-oci-hook, so
// containerd needs neither a pod_annotations allowlist nor the
// hook-injector plugin. See docs/containerd.md.
package main

import (
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/ttrpc"
	"github.com/sirupsen/logrus"

	"github.com/noderesource/spiffe-oci-hook/internal/cli"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/nriplugin"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("spiffe-oci-nri", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("nri-socket", "/var/run/nri/nri.sock", "containerd's NRI socket")
	index := fs.String("plugin-index", "10", "NRI plugin index (order among plugins)")
	hookPath := fs.String("hook-path", "/opt/spiffe-oci-hook/bin/spiffe-oci-hook", "spiffe-oci-hook binary on the node")
	hookConfig := fs.String("hook-config", "", "node configuration file passed to the hook as --config (empty: the hook's default)")
	timeout := fs.Int("hook-timeout", 50, "seconds the runtime gives the hook; above the hook's own timeout (40s by default)")
	if code, done := cli.Parse(fs, args, version); done {
		return code
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	// NRI's stub logs every connection attempt at info level through
	// logrus; keep its details at debug and this plugin's own lines, one
	// per change of state, in one format.
	logrus.SetOutput(io.Discard)
	logrus.SetLevel(logrus.DebugLevel)
	logrus.AddHook(logrusToSlog{log})
	hook := &api.Hook{Path: *hookPath, Args: []string{"spiffe-oci-hook"}, Timeout: api.Int(*timeout)}
	if *hookConfig != "" {
		hook.Args = append(hook.Args, "--config", *hookConfig)
	}
	r := &nriplugin.Runner{
		Plugin: &nriplugin.Plugin{Hook: hook},
		Socket: *socket,
		Name:   nriplugin.Name,
		Index:  *index,
		Log:    log,
	}
	// A DaemonSet rollout sends SIGTERM: stop at once rather than wait out
	// the grace period. The plugin holds no state worth a goodbye.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("starting", logkey.Version, version, logkey.NRISocket, *socket, "hook", *hookPath)
	if err := r.Run(ctx); err != nil {
		log.Error("NRI plugin stopped", logkey.Error, err)
		return 1
	}
	log.Info("stopped")
	return 0
}

// logrusToSlog forwards the lines NRI's stub and ttrpc log through
// logrus to slog, their informational ones at debug. So are ttrpc's errors
// of a server that is closing: when the runtime goes away, ttrpc may still
// be setting up a connection it then refuses; the runner says once that
// the connection was lost, and an error line for the same event would be
// a false alarm.
type logrusToSlog struct{ log *slog.Logger }

func (logrusToSlog) Levels() []logrus.Level { return logrus.AllLevels }

func (h logrusToSlog) Fire(e *logrus.Entry) error {
	level := slog.LevelDebug
	switch {
	case e.Level <= logrus.ErrorLevel:
		level = slog.LevelError
	case e.Level == logrus.WarnLevel:
		level = slog.LevelWarn
	}
	if err, ok := e.Data[logrus.ErrorKey].(error); ok && errors.Is(err, ttrpc.ErrServerClosed) {
		level = slog.LevelDebug
	}
	attrs := make([]any, 0, 2*len(e.Data))
	for k, v := range e.Data {
		attrs = append(attrs, k, v)
	}
	h.log.Log(context.Background(), level, "nri: "+e.Message, attrs...)
	return nil
}
