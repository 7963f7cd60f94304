package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/noderesource/spiffe-oci-hook/internal/cli"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/statedir"
	"github.com/noderesource/spiffe-oci-hook/internal/status"
)

// exitNotRunning is what `status` returns when the refresher does not
// answer (as systemctl status and LSB init scripts do).
const exitNotRunning = 3

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
	running, err := status.Show(ctx, stdout, statedir.Store{Dir: cfg.StateDir}, cfg.StatusSocket())
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
	text, err := status.NewClient(cfg.StatusSocket()).Probe(ctx, fs.Arg(0))
	if err != nil {
		fmt.Fprintln(stderr, "spiffe-oci-refresher probe:", err)
		return 1
	}
	fmt.Fprintln(stdout, text)
	return 0
}
