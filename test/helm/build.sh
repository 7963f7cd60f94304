#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds, from the versions pinned in this directory's go.mod:
#
#   OUTDIR/helm       helm.sh/helm/v3/cmd/helm (v3.22.0): helm lint, helm template
#   OUTDIR/kustomize  ./kustomize, the kustomize library helm pins
#                     (sigs.k8s.io/kustomize/api): builds the kustomize
#                     directories the chart is compared with
#
# for test/packaging. An existing binary newer than go.mod and go.sum is kept. Builds are -mod=readonly
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

cd "$here"
build() {
	local name="$1" pkg="$2"
	local dst="$out/$name"
	if [ -x "$dst" ] && [ "$dst" -nt "$here/go.mod" ] && [ "$dst" -nt "$here/go.sum" ]; then
		echo "build.sh: $name is up to date ($dst)" >&2
		return 0
	fi
	echo "build.sh: building $name -> $dst" >&2
	local tmp="$dst.tmp.$$"
	trap 'rm -f "$tmp"' RETURN
	go build -mod=readonly -trimpath -o "$tmp" "$pkg"
	mv -f "$tmp" "$dst"
}

build helm helm.sh/helm/v3/cmd/helm
build kustomize ./kustomize
