// Command spiffe-oci-nri is an NRI plugin for containerd: it passes a pod's
// identity annotation to its containers and injects spiffe-oci-hook, so
// containerd needs neither a pod_annotations allowlist nor the
// hook-injector plugin. See README.md.
package main

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"

	"github.com/noderesource/spiffe-oci-hook/internal/cli"
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
	timeout := fs.Int("hook-timeout", 15, "seconds the runtime gives the hook; above the hook's own timeout")
	if code, done := cli.Parse(fs, args, version); done {
		return code
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	hook := &api.Hook{Path: *hookPath, Args: []string{"spiffe-oci-hook"}, Timeout: api.Int(*timeout)}
	if *hookConfig != "" {
		hook.Args = append(hook.Args, "--config", *hookConfig)
	}
	s, err := stub.New(&nriplugin.Plugin{Hook: hook},
		stub.WithPluginName("spiffe-oci-hook"), stub.WithPluginIdx(*index), stub.WithSocketPath(*socket))
	if err != nil {
		log.Error("creating NRI plugin", "error", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("starting", "version", version, "nri_socket", *socket, "hook", *hookPath)
	if err := s.Run(ctx); err != nil && ctx.Err() == nil {
		log.Error("NRI plugin stopped", "error", err)
		return 1
	}
	return 0
}
