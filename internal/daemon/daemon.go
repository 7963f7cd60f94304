// Package daemon is the refresher's process around refresh.Refresher: its
// log, its endpoints (status socket, metrics address), SIGHUP reloads of
// the node configuration and systemd's notifications. The refresher's
// main parses flags and hands them here, as spiffe-helper's main hands
// its configuration to sidecar.RunDaemon.
package daemon

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/refresh"
	"github.com/noderesource/spiffe-oci-hook/internal/selinux"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
)

// Options are what main parsed.
type Options struct {
	// Load reads the node configuration: at start and on every SIGHUP.
	Load func() (config.Config, error)
	// ConfigPath names the configuration file in the reload's log line.
	ConfigPath string
	// Debug logs every rotation whatever log_level says (--debug).
	Debug   bool
	Version string
	// Stderr receives the log.
	Stderr io.Writer
}

// Run serves until ctx ends (SIGTERM, SIGINT), then returns nil; or
// returns the error that stopped it, which it has logged already.
func Run(ctx context.Context, o Options) error {
	level := new(slog.LevelVar)
	log := NewLogger(o.Stderr, level)
	cfg, err := o.Load()
	if err != nil {
		log.Error("configuration", logkey.Error, err)
		return err
	}
	setLevel := func(cfg config.Config) {
		if o.Debug || cfg.Refresher.LogLevel == config.LogDebug {
			level.Set(slog.LevelDebug)
		} else {
			level.Set(slog.LevelInfo)
		}
	}
	setLevel(cfg)

	r := refresh.New(cfg, log)
	r.Labeler = selinux.For
	r.Version = o.Version
	srv, err := status.Listen(cfg.StatusSocket(), cfg.Refresher.MetricsAddress, r.Metrics.Handler(), r.Report, log)
	if err != nil {
		log.Error("metrics", logkey.Error, err)
		return err
	}
	// The endpoints outlive Run, so that /readyz answers until the end,
	// and are closed (the socket removed) before the process exits.
	srvCtx, srvStop := context.WithCancel(context.Background())
	srvDone := make(chan struct{})
	go func() { srv.Serve(srvCtx); close(srvDone) }()
	defer func() { srvStop(); <-srvDone }()
	log.Info("starting", logkey.Version, o.Version, "agent_api", cfg.AgentAPI, logkey.AgentSocket, cfg.NodeAgentSocket(), logkey.StateDir, cfg.StateDir, "metrics", addrs(srv))

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	loop := reloads{load: o.Load, apply: r.Reload, counted: r.Metrics.Reloaded, setLevel: setLevel, level: level, log: log, path: o.ConfigPath}
	hupCtx, hupStop := context.WithCancel(ctx)
	defer hupStop()
	go loop.run(hupCtx, hup)

	ready := func() {
		// Not under systemd, NOTIFY_SOCKET is unset and this does nothing.
		if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
			log.Warn("notifying systemd", logkey.Error, err)
		}
	}
	if err := r.Run(ctx, ready); err != nil {
		log.Error("refresher stopped", logkey.Error, err)
		return err
	}
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	return nil
}

// NewLogger is the refresher's log: text lines on w at level. Under
// systemd (JOURNAL_STREAM set) without a time, which journald stamps.
func NewLogger(w io.Writer, level slog.Leveler) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if os.Getenv("JOURNAL_STREAM") != "" {
		opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func addrs(s *status.Server) string {
	var out []string
	for _, a := range s.Addrs() {
		out = append(out, a.Network()+":"+a.String())
	}
	return strings.Join(out, ",")
}
