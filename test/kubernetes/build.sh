#!/usr/bin/env bash
# build.sh OUTDIR
#
# Builds the one-node cluster of test/cluster from the versions pinned in
# this directory's go.mod:
#
#   OUTDIR/kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
#   kubectl   k8s.io/kubernetes/cmd/... v1.34.4
#   OUTDIR/etcd  go.etcd.io/etcd/server/v3 v3.6.4
#
# k8s.io/kubernetes requires its 29 staging modules at v0.0.0; go.mod
# replaces each with k8s.io/<name> v0.34.4, which the proxy serves. Every
# path was added with its version (`go get -tool ...@v1.34.4`): without it
# go picks a newer Kubernetes whose etcd requirement conflicts.
#
# The version is stamped with -X, as Kubernetes' own build does: without it
# the binaries say v0.0.0-master, and a chart's kubeVersion constraint
# refuses the cluster.
#
# A binary newer than go.mod and go.sum is kept. Cold, on two idle cores:
# about 8 minutes (kube-apiserver is most of it); see docs/cluster.md.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

export CGO_ENABLED=0
k8s=v1.34.4
commit=$(go list -mod=readonly -m -f '{{.Version}}' k8s.io/kubernetes)
[ "$commit" = "$k8s" ] || { echo "build.sh: go.mod pins k8s.io/kubernetes $commit, not $k8s" >&2; exit 1; }
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=34 -X $pkg.gitTreeState=clean"
	ldflags+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
	tools_build "$cmd" "k8s.io/kubernetes/cmd/$cmd" -trimpath -ldflags "$ldflags"
done
tools_build etcd go.etcd.io/etcd/server/v3 -trimpath -ldflags "-s -w"
