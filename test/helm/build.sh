#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds helm (helm.sh/helm/v3 v3.22.0, pinned in this directory's go.mod)
# into OUTDIR/helm, for `helm lint` and `helm template` in test/packaging.
# An existing binary newer than go.mod is kept. Builds are -mod=readonly
# (go.sum here is complete), serialized with flock so that concurrent test
# processes do not race, and installed atomically (temp file, then mv).
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

exec 9>"$out/.helm-build.lock"
flock 9

dst="$out/helm"
if [ -x "$dst" ] && [ "$dst" -nt "$here/go.mod" ] && [ "$dst" -nt "$here/go.sum" ]; then
	echo "build.sh: helm is up to date ($dst)" >&2
	exit 0
fi
echo "build.sh: building helm -> $dst" >&2
tmp="$dst.tmp.$$"
trap 'rm -f "$tmp"' EXIT
cd "$here"
go build -mod=readonly -trimpath -o "$tmp" helm.sh/helm/v3/cmd/helm
mv -f "$tmp" "$dst"
