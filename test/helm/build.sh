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

. "$(dirname "${BASH_SOURCE[0]}")/../lib/tools.sh"
tools_init "$@"

export CGO_ENABLED=0

tools_build helm helm.sh/helm/v3/cmd/helm -trimpath -ldflags "-s -w"
tools_build kustomize ./kustomize -trimpath -ldflags "-s -w"
