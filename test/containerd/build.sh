#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds containerd for the CRI tests (test/cri) from the pinned tools
# module in this directory (github.com/containerd/containerd/v2 v2.4.2):
#
#   OUTDIR/containerd                 cmd/containerd
#   OUTDIR/containerd-shim-runc-v2    cmd/containerd-shim-runc-v2
#   OUTDIR/ctr                        cmd/ctr
#
# A binary that already exists and is newer than this directory's go.mod is
# skipped, so re-running is cheap. The first build takes about 1.5 minutes
# on 2 cores; later builds hit the Go build cache. Builds are static
# (CGO_ENABLED=0, no btrfs, devmapper or zfs snapshotters: the tests use
# overlayfs), -mod=readonly (go.sum here is complete), serialized with flock,
# and installed atomically (build to a temp file, then mv).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

export CGO_ENABLED=0
tags="no_btrfs no_devmapper no_zfs"

tools_build containerd github.com/containerd/containerd/v2/cmd/containerd -trimpath -tags "$tags" -ldflags "-s -w"
tools_build containerd-shim-runc-v2 github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 -trimpath -tags "$tags" -ldflags "-s -w"
tools_build ctr github.com/containerd/containerd/v2/cmd/ctr -trimpath -tags "$tags" -ldflags "-s -w"
