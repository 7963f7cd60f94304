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
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/noderesource/spiffe-oci-hook/internal/cli"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/daemon"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// A SIGHUP before the daemon's handler is installed must not kill it.
	signal.Ignore(syscall.SIGHUP)
	// A rotation of every container at once allocates in a burst: a
	// quarter of the collector's default headroom keeps a busy node's
	// daemon small for a little more CPU (BENCHMARKS.md, the refresher at
	// 1,000 containers). GOGC in the environment wins.
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
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err := daemon.Run(ctx, daemon.Options{Load: flags.Load, ConfigPath: flags.Path(), Debug: *debugFlag, Version: version, Stderr: stderr})
	if err != nil {
		return 1 // logged by daemon.Run
	}
	return 0
}
