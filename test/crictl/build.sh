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

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTDIR" >&2
	exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"

export GOWORK=off
export CGO_ENABLED=0

exec 9>"$out/.build.lock"
flock 9

cd "$here"

dst="$out/crictl"
if [ -x "$dst" ] && [ "$dst" -nt "$here/go.mod" ]; then
	echo "build.sh: crictl is up to date ($dst)" >&2
	exit 0
fi
echo "build.sh: building crictl -> $dst" >&2
trap 'rm -f "$dst.tmp.$$"' EXIT
go build -mod=readonly -trimpath -o "$dst.tmp.$$" sigs.k8s.io/cri-tools/cmd/crictl
mv -f "$dst.tmp.$$" "$dst"
