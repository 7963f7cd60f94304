#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds the real SPIRE binaries used by the integration tests
# (internal/spiretest) from the pinned tools module in this directory:
#
#   OUTDIR/spire-server   github.com/spiffe/spire/cmd/spire-server  (v1.13.3)
#   OUTDIR/spire-agent    github.com/spiffe/spire/cmd/spire-agent   (v1.13.3)
#   OUTDIR/spiffe-helper  github.com/spiffe/spiffe-helper/cmd/spiffe-helper (v0.11.0)
#
# A binary that already exists and is newer than this directory's go.mod is
# skipped, so re-running is cheap. The first build takes several minutes
# (spire-server pulls in every cloud SDK); later builds hit the Go build cache.
#
# Builds are -mod=readonly (go.sum here is complete), cgo enabled (the sqlite3
# datastore of spire-server needs it), serialized with flock so concurrent
# `go test` processes don't race, and installed atomically (build to a temp
# file, then mv).
set -euo pipefail

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTDIR" >&2
	exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"

export GOWORK=off
export CGO_ENABLED="${CGO_ENABLED:-1}"

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
	go build -mod=readonly -o "$tmp" "$pkg"
	mv -f "$tmp" "$dst"
}

build spire-server github.com/spiffe/spire/cmd/spire-server
build spire-agent github.com/spiffe/spire/cmd/spire-agent
build spiffe-helper github.com/spiffe/spiffe-helper/cmd/spiffe-helper
