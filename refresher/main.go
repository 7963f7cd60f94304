// Command spiffe-oci-refresher is the node daemon that keeps the SVIDs
// spiffe-oci-hook delivered fresh for as long as each container lives.
// It runs under systemd (Type=notify) or in a DaemonSet; see docs/installing.md.
//
//	spiffe-oci-refresher [flags]                   run the daemon
//	spiffe-oci-refresher status [flags]            one line per served container
//	spiffe-oci-refresher probe [flags] healthz|readyz   exit 0 if healthy/ready
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/noderesource/spiffe-oci-hook/internal/cli"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/label"
	"github.com/noderesource/spiffe-oci-hook/internal/metrics"
	"github.com/noderesource/spiffe-oci-hook/internal/record"
	"github.com/noderesource/spiffe-oci-hook/internal/refresh"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// exitNotRunning is what `status` returns when the refresher does not
// answer (as systemctl status and LSB init scripts do).
const exitNotRunning = 3

func main() {
	// A SIGHUP before the daemon's handler is installed must not kill it.
	signal.Ignore(syscall.SIGHUP)
	// The refresher holds about 30 KiB per container, and a rotation of
	// every container at once allocates in a burst (each stream's new SVID
	// parsed before its write slot frees): a quarter of the collector's
	// default headroom keeps a busy node's daemon small. At 1,000
	// containers (make bench, refresher part, three goroutines per
	// container then) the peak was 61.5 MiB at GOGC=50, 58.8 at 30 and
	// 57.2-57.4 at 25, for about 100 ms more CPU per rotation of all of
	// them (BENCHMARKS.md). GOGC in the environment wins.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(25)
	}
	args := os.Args[1:]
	if len(args) > 0 {
		switch args[0] {
		case "status":
			os.Exit(runStatus(args[1:], os.Stdout, os.Stderr))
		case "probe":
			os.Exit(runProbe(args[1:], os.Stdout, os.Stderr))
		}
	}
	os.Exit(run(args, os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("spiffe-oci-refresher", flag.ContinueOnError)
	fs.SetOutput(stderr)
	flags := config.Bind(fs)
	flags.BindRefresher()
	debugFlag := fs.Bool("debug", false, "log every rotation (wins over log_level)")
	if code, done := cli.Parse(fs, args, version); done {
		return code
	}
	level := new(slog.LevelVar)
	setLevel := func(cfg config.Config) {
		if *debugFlag || cfg.Refresher.LogLevel == config.LogDebug {
			level.Set(slog.LevelDebug)
		} else {
			level.Set(slog.LevelInfo)
		}
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
	setLevel(cfg)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	r := refresh.New(cfg, log)
	r.Labeler = label.For
	r.Version = version
	srv, err := metrics.Listen(cfg.StatusSocket(), cfg.Refresher.MetricsAddress, r.Metrics, r.Report, log)
	if err != nil {
		log.Error("metrics", "error", err)
		return 1
	}
	// The endpoints outlive Run, so that /readyz answers until the end,
	// and are closed (the socket removed) before the process exits.
	srvCtx, srvStop := context.WithCancel(context.Background())
	srvDone := make(chan struct{})
	go func() { srv.Serve(srvCtx); close(srvDone) }()
	defer func() { srvStop(); <-srvDone }()
	log.Info("starting", "version", version, "agent_api", cfg.AgentAPI, "agent_socket", cfg.NodeAgentSocket(), "state_dir", cfg.StateDir, "metrics", addrs(srv))

	// SIGHUP: reread the node configuration. A bad one is refused and the
	// one in force stays; streams and files are never touched.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		for range hup {
			next, err := flags.Load()
			if err == nil {
				err = r.Reload(next)
			}
			r.Metrics.Reloaded(err)
			if err != nil {
				log.Error("configuration reload refused; the running configuration stays in force", "error", err)
				continue
			}
			setLevel(next)
			log.Info("configuration reloaded", "config", flags.Path(), "log_level", level.Level().String(), "agent_socket", next.NodeAgentSocket())
		}
	}()

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

func addrs(s *metrics.Server) string {
	var out []string
	for _, a := range s.Addrs() {
		out = append(out, a.Network()+":"+a.String())
	}
	return strings.Join(out, ",")
}

// runStatus prints one line about the refresher and one per container.
func runStatus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("spiffe-oci-refresher status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	flags := config.Bind(fs)
	flags.BindRefresher()
	if code, done := cli.Parse(fs, args, version); done {
		return code
	}
	cfg, err := flags.Load()
	if err != nil {
		fmt.Fprintln(stderr, "spiffe-oci-refresher status:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	running, err := status.Show(ctx, stdout, record.Store{Dir: cfg.StateDir}, cfg.StatusSocket())
	if err != nil {
		fmt.Fprintln(stderr, "spiffe-oci-refresher status:", err)
		return 1
	}
	if !running {
		return exitNotRunning
	}
	return 0
}

// runProbe is the DaemonSet's liveness and readiness probe: GET /healthz
// or /readyz on the refresher's unix socket; exit 0 on HTTP 200.
func runProbe(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("spiffe-oci-refresher probe", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: spiffe-oci-refresher probe [flags] healthz|readyz")
		fs.PrintDefaults()
	}
	flags := config.Bind(fs)
	flags.BindRefresher()
	if code, done := cli.Parse(fs, args, version); done {
		return code
	}
	if fs.NArg() != 1 || (fs.Arg(0) != "healthz" && fs.Arg(0) != "readyz") {
		fs.Usage()
		return 2
	}
	cfg, err := flags.Load()
	if err != nil {
		fmt.Fprintln(stderr, "spiffe-oci-refresher probe:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	code, body, err := status.NewClient(cfg.StatusSocket()).Get(ctx, "/"+fs.Arg(0))
	if err != nil {
		fmt.Fprintln(stderr, "spiffe-oci-refresher probe:", err)
		return 1
	}
	if code != http.StatusOK {
		fmt.Fprintf(stderr, "spiffe-oci-refresher probe: %s: HTTP %d: %s\n", fs.Arg(0), code, strings.TrimSpace(string(body)))
		return 1
	}
	fmt.Fprintln(stdout, strings.TrimSpace(string(body)))
	return 0
}
