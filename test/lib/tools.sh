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
#                                 (a temp file, then mv)
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
	go build -mod=readonly "$@" -o "$tmp" "$pkg" || { rm -f "$tmp"; return 1; }
	mv -f "$tmp" "$dst"
}
