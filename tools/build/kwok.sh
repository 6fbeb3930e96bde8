#!/usr/bin/env bash
# Build the kwok controller (fake nodes; sets pod phase/podIP/hostIP) into
# $FLOWPROBE_CACHE/bin/kwok-$KWOK_VERSION/kwok.
#
# sigs.k8s.io/kwok has no replace directives, so `go install mod@version` works
# and its own go.sum pins everything. Pin a tag: kwok's main branch tracks Go
# releases newer than ours (GOTOOLCHAIN=local makes that fail loudly).
# PyPI's "kwok" is an unrelated project.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tools/versions.env
source "$ROOT/tools/versions.env"

CACHE=${FLOWPROBE_CACHE:-$HOME/.cache/flowprobe}
OUT=$CACHE/bin/kwok-$KWOK_VERSION
if [[ -x $OUT/kwok ]]; then
  echo "kwok $KWOK_VERSION: cached in $OUT"
  exit 0
fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
# GOWORK=off: a go.work in a parent directory must not change what gets built.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS=-buildvcs=false

mkdir -p "$CACHE/bin"
exec 9>"$CACHE/bin/.kwok-$KWOK_VERSION.lock"
flock 9
if [[ -x $OUT/kwok ]]; then
  echo "kwok $KWOK_VERSION: cached in $OUT"
  exit 0
fi

TMP=$(mktemp -d "$CACHE/bin/.kwok-build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "kwok $KWOK_VERSION: building"
start=$SECONDS
# No version -X flag: pkg/consts.Version already holds the tag's version.
GOBIN=$TMP "$GO" install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
mkdir -p "$OUT"
mv -f "$TMP/kwok" "$OUT/kwok"
echo "kwok $KWOK_VERSION: built in $((SECONDS - start)) s into $OUT"
