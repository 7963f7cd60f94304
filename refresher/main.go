// Command spiffe-oci-refresher is the node daemon that keeps the SVIDs
// spiffe-oci-hook delivered fresh for as long as each container lives.
// It runs under systemd (Type=notify); see README.md.
package main

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/noderesource/spiffe-oci-hook/internal/cli"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/label"
	"github.com/noderesource/spiffe-oci-hook/internal/refresh"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// The refresher holds about 50 KiB per container, and a rotation of
	// every container at once allocates in a burst: half the collector's
	// default headroom keeps a busy node's daemon small at no measured cost
	// in rotation latency (BENCHMARKS.md). GOGC in the environment wins.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(50)
	}
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("spiffe-oci-refresher", flag.ContinueOnError)
	fs.SetOutput(stderr)
	flags := config.Bind(fs)
	flags.BindRefresher()
	debug := fs.Bool("debug", false, "log every rotation")
	if code, done := cli.Parse(fs, args, version); done {
		return code
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	opts := &slog.HandlerOptions{Level: level}
	if os.Getenv("JOURNAL_STREAM") != "" {
		// journald stamps every line itself.
		opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
	}
	log := slog.New(slog.NewTextHandler(stderr, opts))
	cfg, err := flags.Load()
	if err != nil {
		log.Error("configuration", "error", err)
		return 1
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	r := refresh.New(cfg, log)
	r.Labeler = label.For
	log.Info("starting", "version", version, "agent_admin_socket", cfg.AgentAdminSocket, "state_dir", cfg.StateDir)
	ready := func() {
		// Not under systemd, NOTIFY_SOCKET is unset and this does nothing.
		if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
			log.Warn("notifying systemd", "error", err)
		}
	}
	if err := r.Run(ctx, ready); err != nil {
		log.Error("refresher stopped", "error", err)
		return 1
	}
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	return 0
}
