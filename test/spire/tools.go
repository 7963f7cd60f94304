//go:build tools

// Package tools pins the SPIRE server/agent and spiffe-helper commands used by
// the real-SPIRE integration tests. Build them with ./build.sh OUTDIR.
package tools

import (
	_ "github.com/spiffe/spiffe-helper/cmd/spiffe-helper"
	_ "github.com/spiffe/spire/cmd/spire-agent"
	_ "github.com/spiffe/spire/cmd/spire-server"
)
