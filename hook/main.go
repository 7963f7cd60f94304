// Command spiffe-oci-hook is an OCI runtime hook that gives an annotated
// container its SPIFFE X.509 SVID as files before its process starts.
//
// The runtime runs it at createRuntime (CRI-O: prestart) and at poststop,
// with the container's state on stdin. See docs/annotations.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"

	"github.com/noderesource/spiffe-oci-hook/internal/cli"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/hook"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
	"github.com/noderesource/spiffe-oci-hook/internal/selinux"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `Usage: spiffe-oci-hook [flags] [createRuntime|prestart|poststop] < state.json

An OCI hook. The runtime writes the container's state to stdin. Without a
stage argument the stage is taken from the state: "stopped" is poststop,
anything else delivers the identity.

Flags:
`

func main() {
	// A hook lives for milliseconds and allocates little: collecting
	// garbage would only add to container start time.
	debug.SetGCPercent(-1)
	os.Exit(run(os.Args[1:], os.Stdin, os.Stderr))
}

func run(args []string, stdin io.Reader, stderr io.Writer) int {
	fs := flag.NewFlagSet("spiffe-oci-hook", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	flags := config.Bind(fs)
	if code, done := cli.Parse(fs, args, version); done {
		return code
	}
	stage := fs.Arg(0)
	switch stage {
	case "", "createRuntime", "prestart", "poststop":
	default:
		fmt.Fprintf(stderr, "spiffe-oci-hook: unknown stage %q: use createRuntime, prestart or poststop\n", stage)
		return 2
	}
	if fs.NArg() > 1 {
		fmt.Fprintf(stderr, "spiffe-oci-hook: unexpected arguments %q\n", fs.Args()[1:])
		return 2
	}

	state, err := ocistate.ReadState(stdin)
	if err != nil {
		fmt.Fprintf(stderr, "spiffe-oci-hook: %v: run it as an OCI hook, which passes the container state on stdin\n", err)
		return 1
	}
	// Every line is a warning, as the hook's lines have always been in
	// syslog: an operator's journalctl priority filter keeps seeing them.
	log, closeLog := hook.NewLogger(stderr)
	defer closeLog()
	if stage == "poststop" || (stage == "" && ocistate.Stopped(state)) {
		h, code := newHook(flags, state.ID, stderr, log)
		if h == nil {
			return code
		}
		if err := h.Poststop(state.ID); err != nil {
			log.Warn("poststop", logkey.Container, state.ID, logkey.Error, err)
			return 1
		}
		return 0
	}

	// Decide first: a container that did not ask costs the state, at most
	// config.json, and nothing else (not even the node configuration).
	req, err := hook.Find(state)
	if err == nil && req == nil {
		return 0
	}
	h, code := newHook(flags, state.ID, stderr, log)
	if h == nil {
		return code
	}
	if err == nil {
		err = h.Create(context.Background(), req)
	}
	if err == nil {
		return 0
	}
	// These two lines begin with the error (the refusal's is the error
	// alone, as docs/troubleshooting.md quotes them), so the error is
	// their message: a logkey.Error attribute would come last.
	if req != nil && h.Config.FailurePolicy == config.FailOpen {
		log.Warn(fmt.Sprintf("%v; starting it WITHOUT an identity (failure_policy: fail-open)", err), logkey.Container, state.ID)
		h.FailOpen(state, err)
		return 0
	}
	log.Warn(err.Error(), logkey.Container, state.ID)
	return 1
}

// newHook loads the node configuration; on error it reports and returns
// the exit code instead of a hook.
func newHook(flags *config.Flags, id string, stderr io.Writer, log *slog.Logger) (*hook.Hook, int) {
	cfg, err := flags.Load()
	if err != nil {
		fmt.Fprintf(stderr, "spiffe-oci-hook: container %s: %v\n", id, err)
		return nil, 1
	}
	return &hook.Hook{Config: cfg, Log: log, Labeler: selinux.For}, 0
}
