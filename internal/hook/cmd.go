package hook

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/noderesource/spiffe-oci-hook/internal/cli"
	"github.com/noderesource/spiffe-oci-hook/internal/config"
	"github.com/noderesource/spiffe-oci-hook/internal/handoff"
	"github.com/noderesource/spiffe-oci-hook/internal/logkey"
	"github.com/noderesource/spiffe-oci-hook/internal/ocistate"
)

// Command is one of the hook's two binaries: spiffe-oci-hook, which hands
// the container to the refresher, and spiffe-oci-hook-direct, which asks
// the agent itself and which spiffe-oci-hook runs when no refresher
// answers. Both take the same arguments and do the same at poststop.
type Command struct {
	Name    string
	Version string
	// Deliver returns the delivery of a hook, made with the node's
	// configuration: h.Handoff, or package deliver's Direct.
	Deliver func(h *Hook) DeliverFunc
	// Fallback, when set, runs when no refresher answered (an error
	// wrapping handoff.ErrUnavailable): it replaces the process with
	// spiffe-oci-hook-direct, given the same arguments and state, and
	// returns only if it could not.
	Fallback func(args []string, state []byte) error
}

const usage = `Usage: %s [flags] [createRuntime|prestart|poststop] < state.json

An OCI hook. The runtime writes the container's state to stdin. Without a
stage argument the stage is taken from the state: "stopped" is poststop,
anything else delivers the identity.

Flags:
`

// Run runs the command with args (without the program name), the OCI
// state on stdin, and returns the exit code.
func (c Command) Run(args []string, stdin io.Reader, stderr io.Writer) int {
	fs := flag.NewFlagSet(c.Name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprintf(stderr, usage, c.Name); fs.PrintDefaults() }
	flags := config.Bind(fs)
	if code, done := cli.Parse(fs, args, c.Version); done {
		return code
	}
	stage := fs.Arg(0)
	switch stage {
	case "", "createRuntime", "prestart", "poststop":
	default:
		fmt.Fprintf(stderr, "%s: unknown stage %q: use createRuntime, prestart or poststop\n", c.Name, stage)
		return 2
	}
	if fs.NArg() > 1 {
		fmt.Fprintf(stderr, "%s: unexpected arguments %q\n", c.Name, fs.Args()[1:])
		return 2
	}

	raw, err := ocistate.ReadRaw(stdin)
	var state *specs.State
	if err == nil {
		state, err = ocistate.ParseState(raw)
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v: run it as an OCI hook, which passes the container state on stdin\n", c.Name, err)
		return 1
	}
	// Every line is a warning, as the hook's lines have always been in
	// syslog: an operator's journalctl priority filter keeps seeing them.
	log, closeLog := NewLogger(stderr)
	defer closeLog()
	if stage == "poststop" || (stage == "" && ocistate.Stopped(state)) {
		h, code := c.newHook(flags, state.ID, stderr, log)
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
	req, err := Find(state)
	if err == nil && req == nil {
		return 0
	}
	h, code := c.newHook(flags, state.ID, stderr, log)
	if h == nil {
		return code
	}
	if err == nil {
		err = h.Create(context.Background(), req)
	}
	if err != nil && errors.Is(err, handoff.ErrUnavailable) && c.Fallback != nil {
		log.Info(fmt.Sprintf("%v; asking the agent directly (spiffe-oci-hook-direct)", err), logkey.Container, state.ID)
		err = c.Fallback(args, raw) // returns only if spiffe-oci-hook-direct could not run
		if err != nil {
			err = fmt.Errorf("running spiffe-oci-hook-direct, as no spiffe-oci-refresher answered: %w", err)
		}
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
func (c Command) newHook(flags *config.Flags, id string, stderr io.Writer, log *slog.Logger) (*Hook, int) {
	cfg, err := flags.Load()
	if err != nil {
		fmt.Fprintf(stderr, "%s: container %s: %v\n", c.Name, id, err)
		return nil, 1
	}
	h := &Hook{Config: cfg, Log: log}
	h.Deliver = c.Deliver(h)
	return h, 0
}
