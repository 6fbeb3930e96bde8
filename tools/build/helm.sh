#!/usr/bin/env bash
# Build helm into $FLOWPROBE_CACHE/bin/helm-$HELM_VERSION/helm.
#
# helm.sh/helm/v3 has no replace directives, so `go install mod@version` works
# and helm's own go.sum pins everything. The module path is helm.sh/helm/...,
# not github.com/helm/helm/....
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tools/versions.env
source "$ROOT/tools/versions.env"

CACHE=${FLOWPROBE_CACHE:-$HOME/.cache/flowprobe}
OUT=$CACHE/bin/helm-$HELM_VERSION
if [[ -x $OUT/helm ]]; then
  echo "helm $HELM_VERSION: cached in $OUT"
  exit 0
fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
# GOWORK=off: a go.work in a parent directory must not change what gets built.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS=-buildvcs=false

mkdir -p "$CACHE/bin"
exec 9>"$CACHE/bin/.helm-$HELM_VERSION.lock"
flock 9
if [[ -x $OUT/helm ]]; then
  echo "helm $HELM_VERSION: cached in $OUT"
  exit 0
fi

MAJOR=${HELM_VERSION%%.*}
TMP=$(mktemp -d "$CACHE/bin/.helm-build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "helm $HELM_VERSION: building"
start=$SECONDS
# Without the version stamp `helm version` prints a dev version and charts'
# `helm` semver checks misbehave.
GOBIN=$TMP "$GO" install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v$MAJOR/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v$MAJOR/internal/version.gitTreeState=clean" \
  "helm.sh/helm/v$MAJOR/cmd/helm@v$HELM_VERSION"
mkdir -p "$OUT"
mv -f "$TMP/helm" "$OUT/helm"
echo "helm $HELM_VERSION: built in $((SECONDS - start)) s into $OUT"
