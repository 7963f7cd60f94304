#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds the CNI plugins the one-node cluster of test/cluster configures
# (github.com/containernetworking/plugins v1.9.0, pinned in go.mod):
#
#   OUTDIR/bridge, host-local, loopback
#
# No portmap: the test pods publish no host ports, and portmap would add
# iptables chains to the host. About 15 s cold.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

export CGO_ENABLED=0
base=github.com/containernetworking/plugins/plugins
# Their --version says this instead of "version unknown".
ldflags="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=v1.9.0"
tools_build bridge "$base/main/bridge" -trimpath -ldflags "$ldflags"
tools_build host-local "$base/ipam/host-local" -trimpath -ldflags "$ldflags"
tools_build loopback "$base/main/loopback" -trimpath -ldflags "$ldflags"
