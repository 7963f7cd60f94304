#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds CRI-O for the CRI tests (test/cri) from the pinned tools module in
# this directory:
#
#   OUTDIR/crio    github.com/cri-o/cri-o/cmd/crio  (v1.34.0, see below)
#   OUTDIR/pinns   CRI-O's namespace pinner, C source from the same module zip
#
# Pin: the Go module proxy serves v1.34.0 as commit 5dd0877c91ad (2025-05-14,
# main right after the 1.33 branch), recorded so in the checksum database;
# the GitHub tag v1.34.0 was later moved to d91a449706db (2025-09-10). The
# proxy's copy is what every clean clone gets, byte for byte, so that is the
# one pinned; for what the tests use (hooks.d, the CRI, conmon, runc) both
# behave the same.
#
# go.sum was seeded with CRI-O's own go.sum: the checksum database misses
# some of its dependencies.
#
# A binary that already exists and is newer than this directory's go.mod is
# skipped, so re-running is cheap. The first crio build takes about 2.5
# minutes on 2 cores; later builds hit the Go build cache. Builds are
# -mod=readonly, serialized with flock, and installed atomically (build to a
# temp file, then mv). Needs gcc, make and libseccomp-dev (test/deps.sh).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

# cgo: the seccomp tag links libseccomp.
export CGO_ENABLED=1
# The tags CRI-O's Makefile would pick on a Debian host without btrfs,
# devicemapper, gpgme or ostree headers, plus seccomp.
tags="containers_image_ostree_stub containers_image_openpgp exclude_graphdriver_btrfs exclude_graphdriver_devicemapper btrfs_noversion seccomp"

tools_build crio github.com/cri-o/cri-o/cmd/crio -trimpath -tags "$tags" -ldflags "-s -w"

dst="$out/pinns"
if tools_fresh "$dst"; then
	echo "build.sh: pinns is up to date ($dst)" >&2
else
	echo "build.sh: building pinns -> $dst" >&2
	go mod download github.com/cri-o/cri-o
	src="$(go list -mod=readonly -m -f '{{.Dir}}' github.com/cri-o/cri-o)"
	work="$(mktemp -d)"
	trap 'rm -rf "$work"' EXIT
	# The module cache is read-only, and pinns' Makefile writes ../bin/pinns.
	cp -r "$src/pinns" "$work/pinns"
	chmod -R u+w "$work"
	make -s -C "$work/pinns" >&2
	cp "$work/bin/pinns" "$dst.tmp.$$"
	mv -f "$dst.tmp.$$" "$dst"
fi
