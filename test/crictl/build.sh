#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds crictl for the CRI tests (test/cri) from the pinned tools module in
# this directory:
#
#   OUTDIR/crictl   sigs.k8s.io/cri-tools/cmd/crictl  (v1.37.0)
#
# The tests drive CRI-O and containerd through it, as the kubelet would
# through the CRI. A binary that already exists and is newer than this
# directory's go.mod is skipped. Builds are static, -mod=readonly (go.sum
# here is complete), serialized with flock, and installed atomically.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

export CGO_ENABLED=0

tools_build crictl sigs.k8s.io/cri-tools/cmd/crictl -trimpath -ldflags "-s -w"
