# Sourced by each tools module's build.sh (test/spire, test/crio,
# test/containerd, test/crictl, test/helm): the part they share of building
# a pinned third-party program for the tests.
#
#   tools_init "$@"               check the one argument (OUTDIR), create it,
#                                 take the build lock and cd into the calling
#                                 script's module directory; sets $here, $out
#   tools_fresh DST               DST exists and is newer than the module's
#                                 go.mod and go.sum: re-running is cheap
#   tools_build NAME PKG [FLAG..] build PKG as OUTDIR/NAME unless fresh, with
#                                 -mod=readonly (go.sum is complete) and the
#                                 given go build flags, installed atomically
#                                 (a temp file, then mv); the linked binary
#                                 is kept in the Go build cache, so a new
#                                 clone with warm caches links nothing
#
# Every tool is linked with -ldflags "-s -w" (no symbol table, no DWARF,
# as go run links anyway), through go run so that the Go build cache keeps
# the executable: a new clone with warm caches copies the tools out of it
# (about 20 s for all of them) instead of linking each again (about 150 s). With
# TOOLS_KEEP_DEBUG set, tools_build links with go build instead, keeping
# the symbols: test/spire does so for spiffe-helper, so that the
# benchmarks' baseline stays the binary they always hashed.
#
# The lock is per module: concurrent test processes that build the same
# module never race on a binary, while two different modules (make -j2
# tools) build side by side; Go's links are single-threaded.

tools_init() {
	if [ $# -ne 1 ]; then
		echo "usage: $0 OUTDIR" >&2
		exit 2
	fi
	here="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
	mkdir -p "$1"
	out="$(cd "$1" && pwd)"
	export GOWORK=off
	exec 9>"$out/.build.$(basename "$here").lock"
	flock 9
	cd "$here"
}

tools_fresh() {
	[ -x "$1" ] && [ "$1" -nt "$here/go.mod" ] && [ "$1" -nt "$here/go.sum" ]
}

tools_build() {
	local name="$1" pkg="$2"
	shift 2
	local dst="$out/$name"
	if tools_fresh "$dst"; then
		echo "build.sh: $name is up to date ($dst)" >&2
		return 0
	fi
	echo "build.sh: building $name -> $dst" >&2
	local tmp="$dst.tmp.$$"
	if [ -n "${TOOLS_KEEP_DEBUG:-}" ]; then
		go build -mod=readonly "$@" -o "$tmp" "$pkg" || { rm -f "$tmp"; return 1; }
	else
		# go run caches the executable it links (Go 1.24), where go build
		# -o links again every time; -exec cp copies it out instead of
		# running it. go run links without debug information.
		go run -exec cp -mod=readonly "$@" "$pkg" "$tmp" || { rm -f "$tmp"; return 1; }
	fi
	mv -f "$tmp" "$dst"
}
