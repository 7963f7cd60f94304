#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds the real SPIRE binaries used by the integration tests
# (test/spiretest) from the pinned tools module in this directory:
#
#   OUTDIR/spire-server   github.com/spiffe/spire/cmd/spire-server  (v1.13.3)
#   OUTDIR/spire-agent    github.com/spiffe/spire/cmd/spire-agent   (v1.13.3)
#   OUTDIR/spiffe-helper  github.com/spiffe/spiffe-helper/cmd/spiffe-helper (v0.11.0)
#
# A binary that already exists and is newer than this directory's go.mod is
# skipped, so re-running is cheap. The first build takes several minutes
# (spire-server pulls in every cloud SDK); later builds hit the Go build cache.
#
# Builds are -mod=readonly (go.sum here is complete), cgo enabled (the sqlite3
# datastore of spire-server needs it), serialized with flock so concurrent
# `go test` processes don't race, and installed atomically (build to a temp
# file, then mv).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

export CGO_ENABLED="${CGO_ENABLED:-1}"

tools_build spire-server github.com/spiffe/spire/cmd/spire-server -ldflags "-s -w"
tools_build spire-agent github.com/spiffe/spire/cmd/spire-agent -ldflags "-s -w"
# With its symbols, as it was built since the benchmarks began: the
# agent hashes this binary in their baseline (test/lib/tools.sh).
TOOLS_KEEP_DEBUG=1 tools_build spiffe-helper github.com/spiffe/spiffe-helper/cmd/spiffe-helper
