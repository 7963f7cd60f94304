#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds spire-controller-manager v0.7.0, as SPIRE's Helm chart (spire
# 0.30.0) runs it beside the SPIRE server, from the pinned tools module in
# this directory, for the cluster tests (test/cluster, make cluster):
#
#   OUTDIR/spire-controller-manager  github.com/spiffe/spire-controller-manager/cmd
#
# Its CRDs are applied from the same module's config/crd/bases (the
# module cache holds them once this has run; `go list -m -f {{.Dir}}`
# here names the directory). `go install …@v0.7.0` would be refused here:
# the module proxy lists no versions.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

export CGO_ENABLED=0
tools_build spire-controller-manager github.com/spiffe/spire-controller-manager/cmd -trimpath -ldflags "-s -w"
