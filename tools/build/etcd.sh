#!/usr/bin/env bash
# Build etcd (server) from Go modules into $FLOWPROBE_CACHE/bin/etcd-$ETCD_VERSION/etcd.
#
# `go install go.etcd.io/etcd/server/v3@vX` is refused because etcd's server
# go.mod has replace directives (pointing at sibling directories). The build
# module tools/gomod/etcd requires the server as a `tool` instead, so MVS
# resolves api/client/pkg at their published tags. It is kept apart from the
# kube module so etcd's server deps cannot raise the etcd client k8s pins.
# Debian's etcd 3.4 is too old for k8s >= 1.35 (RequestWatchProgress).
#
# Usage: tools/build/etcd.sh [--regen]   (regenerates automatically on a version bump)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tools/versions.env
source "$ROOT/tools/versions.env"

CACHE=${FLOWPROBE_CACHE:-$HOME/.cache/flowprobe}
OUT=$CACHE/bin/etcd-$ETCD_VERSION
MOD=$ROOT/tools/gomod/etcd
PKG=go.etcd.io/etcd/server/v3   # the module root is package main
REGEN=0
[[ ${1:-} == --regen ]] && REGEN=1

if [[ $REGEN == 0 && -x $OUT/etcd ]]; then
  echo "etcd $ETCD_VERSION: cached in $OUT"
  exit 0
fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
# GOWORK=off: a go.work in a parent directory must not change what gets built.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS=-buildvcs=false

mkdir -p "$CACHE/bin"
exec 9>"$CACHE/bin/.etcd-$ETCD_VERSION.lock"
flock 9
if [[ $REGEN == 0 && -x $OUT/etcd ]]; then
  echo "etcd $ETCD_VERSION: cached in $OUT"
  exit 0
fi

if [[ $REGEN == 1 ]] || ! grep -Eq "^(require)?[[:space:]]+$PKG v$ETCD_VERSION( |\$)" "$MOD/go.mod" 2>/dev/null; then
  echo "etcd $ETCD_VERSION: regenerating $MOD"
  mkdir -p "$MOD"
  (
    cd "$MOD"
    rm -f go.mod go.sum
    "$GO" mod init flowprobe.invalid/tools/etcd >/dev/null 2>&1
    # `go mod init` writes the local Go version (e.g. 1.26.8); use etcd's own
    # minimum instead so any Go that can build etcd can build this module.
    gomod=$(GOFLAGS=-mod=mod "$GO" mod download -json "$PKG@v$ETCD_VERSION" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    "$GO" mod edit -go="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")"
    GOFLAGS=-mod=mod "$GO" get -tool "$PKG@v$ETCD_VERSION"
    GOFLAGS=-mod=mod "$GO" mod tidy
  )
fi

TMP=$(mktemp -d "$CACHE/bin/.etcd-build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "etcd $ETCD_VERSION: building"
start=$SECONDS
# etcd's own build script stamps the git SHA here; the version itself is a
# constant in go.etcd.io/etcd/api/v3/version, so nothing else is needed.
(cd "$MOD" && "$GO" build -mod=readonly -trimpath \
  -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=v$ETCD_VERSION" -o "$TMP/etcd" "$PKG")
mkdir -p "$OUT"
mv -f "$TMP/etcd" "$OUT/etcd"
echo "etcd $ETCD_VERSION: built in $((SECONDS - start)) s into $OUT"
