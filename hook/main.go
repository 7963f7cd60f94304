// Command spiffe-oci-hook is an OCI runtime hook that gives an annotated
// container its SPIFFE identity as files before its process starts.
//
// The runtime runs it at createRuntime (CRI-O: prestart) and at poststop,
// with the container's state on stdin. See docs/annotations.md. It hands
// the container to spiffe-oci-refresher, which asks the agent over its
// open connection and writes the files, then mounts them itself. With no
// refresher to answer it runs spiffe-oci-hook-direct (hook/direct), which
// asks the agent itself. It links no gRPC: its exec time is paid by every
// annotated container's start.
package main

import (
	"os"
	"runtime/debug"

	"github.com/noderesource/spiffe-oci-hook/internal/hook"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// A hook lives for milliseconds and allocates little: collecting
	// garbage would only add to container start time.
	debug.SetGCPercent(-1)
	os.Exit(command().Run(os.Args[1:], os.Stdin, os.Stderr))
}

func command() hook.Command {
	return hook.Command{
		Name:     "spiffe-oci-hook",
		Version:  version,
		Deliver:  func(h *hook.Hook) hook.DeliverFunc { return h.Handoff },
		Fallback: hook.ExecDirect,
	}
}
