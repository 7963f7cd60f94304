#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds SPIRE 1.15.3, the primary line of the end-to-end tests, from the
# pinned tools module in this directory:
#
#   OUTDIR/spire-server   github.com/spiffe/spire/cmd/spire-server  (v1.15.3)
#   OUTDIR/spire-agent    github.com/spiffe/spire/cmd/spire-agent   (v1.15.3)
#
# OUTDIR must not be test/spire's (1.13.3) output directory: the binaries
# have the same names. The Makefile uses $(SPIRE_BIN_DIR)/spire-1.15.
# go.mod replaces github.com/Keyfactor/ejbca-go-client-sdk with v1.0.2:
# SPIRE asks for v1.1.0, which the module proxy does not serve.
# About 14 minutes the first time on two cores; seconds once built.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

export CGO_ENABLED="${CGO_ENABLED:-1}"

tools_build spire-server github.com/spiffe/spire/cmd/spire-server -ldflags "-s -w"
tools_build spire-agent github.com/spiffe/spire/cmd/spire-agent -ldflags "-s -w"
