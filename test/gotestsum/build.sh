#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds gotestsum for `make test` from the pinned tools module in this
# directory:
#
#   OUTDIR/gotestsum   gotest.tools/gotestsum  (v1.13.0)
#
# make test runs `go test -json` through it: one line per package while it
# runs, the failures' output at the end, and a JSON file that
# test/testreport reads for the summary (passed, failed, skipped with
# their reasons) and, under CI=true, for the skips allowed by
# test/skips.txt. A binary newer than this directory's go.mod and go.sum
# is kept. -mod=readonly (go.sum here is complete), serialized with flock,
# installed atomically.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

export CGO_ENABLED=0

tools_build gotestsum gotest.tools/gotestsum -trimpath -ldflags "-s -w"
