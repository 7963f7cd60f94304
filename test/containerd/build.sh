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

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTDIR" >&2
	exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"

export GOWORK=off
export CGO_ENABLED=0
tags="no_btrfs no_devmapper no_zfs"

exec 9>"$out/.build.lock"
flock 9

cd "$here"

build() {
	local name="$1" pkg="$2"
	local dst="$out/$name"
	if [ -x "$dst" ] && [ "$dst" -nt "$here/go.mod" ]; then
		echo "build.sh: $name is up to date ($dst)" >&2
		return 0
	fi
	echo "build.sh: building $name -> $dst" >&2
	local tmp="$dst.tmp.$$"
	trap 'rm -f "$tmp"' RETURN
	go build -mod=readonly -trimpath -tags "$tags" -o "$tmp" "$pkg"
	mv -f "$tmp" "$dst"
}

build containerd github.com/containerd/containerd/v2/cmd/containerd
build containerd-shim-runc-v2 github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
build ctr github.com/containerd/containerd/v2/cmd/ctr
