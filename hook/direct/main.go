// Command spiffe-oci-hook-direct is spiffe-oci-hook asking the SPIRE agent
// itself, over a connection of its own, when no spiffe-oci-refresher
// takes the container over (Podman without the refresher's unit, a
// refresher restarting). spiffe-oci-hook runs it, from its own directory,
// with the same arguments and state; it can also be a runtime's hook
// itself. See docs/annotations.md.
package main

import (
	"os"
	"runtime/debug"

	"github.com/noderesource/spiffe-oci-hook/internal/deliver"
	"github.com/noderesource/spiffe-oci-hook/internal/hook"
	"github.com/noderesource/spiffe-oci-hook/internal/selinux"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// A hook lives for milliseconds and allocates little: collecting
	// garbage would only add to container start time.
	debug.SetGCPercent(-1)
	cmd := hook.Command{
		Name:    hook.DirectName,
		Version: version,
		Deliver: func(h *hook.Hook) hook.DeliverFunc {
			d := &deliver.Deliverer{Config: h.Config, Log: h.Log, Labeler: selinux.For}
			return d.Direct
		},
	}
	os.Exit(cmd.Run(os.Args[1:], os.Stdin, os.Stderr))
}
