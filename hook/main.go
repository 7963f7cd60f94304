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
	"log/syslog"
	"os"
	"runtime/debug"

	"github.com/noderesource/spiffe-oci-hook/internal/cli"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/hook"
	"github.com/noderesource/spiffe-oci-hook/internal/label"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
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
	if stage == "poststop" || (stage == "" && ocistate.Stopped(state)) {
		h, log, code := newHook(flags, state.ID, stderr)
		if h == nil {
			return code
		}
		if err := h.Poststop(state.ID); err != nil {
			log.warn(fmt.Sprintf("container %s: poststop: %v", state.ID, err))
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
	h, log, code := newHook(flags, state.ID, stderr)
	if h == nil {
		return code
	}
	if err == nil {
		err = h.Create(context.Background(), req)
	}
	if err == nil {
		return 0
	}
	if req != nil && h.Config.FailurePolicy == config.FailOpen {
		log.warn(fmt.Sprintf("container %s: %v; starting it WITHOUT an identity (failure_policy: fail-open)", state.ID, err))
		h.FailOpen(state, err)
		return 0
	}
	log.warn(fmt.Sprintf("container %s: %v", state.ID, err))
	return 1
}

// newHook loads the node configuration; on error it reports and returns
// the exit code instead of a hook.
func newHook(flags *config.Flags, id string, stderr io.Writer) (*hook.Hook, *logger, int) {
	cfg, err := flags.Load()
	if err != nil {
		fmt.Fprintf(stderr, "spiffe-oci-hook: container %s: %v\n", id, err)
		return nil, nil, 1
	}
	log := newLogger(stderr)
	return &hook.Hook{Config: cfg, Warn: log.warn, Labeler: label.For}, log, 0
}

// logger writes each line to stderr, which the runtime shows when the hook
// fails, and to syslog (journald) when there is one, because runtimes drop
// a successful hook's output.
type logger struct {
	stderr io.Writer
}

func newLogger(stderr io.Writer) *logger { return &logger{stderr: stderr} }

func (l *logger) warn(msg string) {
	fmt.Fprintln(l.stderr, "spiffe-oci-hook: "+msg)
	if w, err := syslog.New(syslog.LOG_WARNING|syslog.LOG_DAEMON, "spiffe-oci-hook"); err == nil {
		w.Warning(msg)
		w.Close()
	}
}
