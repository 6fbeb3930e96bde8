#!/usr/bin/env bash
# Build the Jaeger v2 binary (an OpenTelemetry Collector distribution with
# in-memory trace storage and the /api/v3 query API) from the Go module proxy.
#
#   tools/build/jaeger.sh            # prints the binary path on stdout
#
# Output: $FLOWPROBE_CACHE/bin/jaeger-$JAEGER_VERSION/jaeger (skipped if present).
#
# `go install github.com/jaegertracing/jaeger/cmd/jaeger@vX` does NOT work:
# Jaeger's go.mod carries `replace github.com/Shopify/sarama => ... v1.33.0`,
# and go install refuses modules with replace directives. So we build inside
# the downloaded module as the main module, which honours that replace and
# verifies every dependency against upstream's own go.sum.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../versions.env
source "$ROOT/tools/versions.env"

CACHE="${FLOWPROBE_CACHE:-$HOME/.cache/flowprobe}"
OUT_DIR="$CACHE/bin/jaeger-$JAEGER_VERSION"
OUT="$OUT_DIR/jaeger"

if [[ -x "$OUT" ]]; then
    echo "$OUT"
    exit 0
fi

# Debian/PATH may lack Go; the project standardises on /usr/local/go.
if ! command -v go >/dev/null 2>&1; then
    PATH="/usr/local/go/bin:$PATH"
fi

# Reproducible, toolchain-pinned, static build. GOWORK=off so a go.work in a
# parent directory cannot leak into the build; -mod=readonly because the
# module cache is read-only and upstream's go.sum must be complete.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false"

MODULE="github.com/jaegertracing/jaeger@v$JAEGER_VERSION"
echo ">> downloading $MODULE" >&2
meta="$(go mod download -json "$MODULE")"
src="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$meta")"
info="$(sed -n 's/^[[:space:]]*"Info": "\(.*\)",\{0,1\}$/\1/p' <<<"$meta")"
# The release time of the tag, so `jaeger version` shows a date that does not
# change from one rebuild to the next.
released="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info" 2>/dev/null || true)"
if [[ -z "$src" || ! -d "$src" ]]; then
    echo "error: go mod download did not report a source dir for $MODULE" >&2
    exit 1
fi

# Jaeger v2 ships under v1.x module tags (v1.76.0 == v2.13.0); the CHANGELOG
# maps them, and `jaeger version` should print the v2 name users know.
v2="$(sed -n "s|^v$JAEGER_VERSION / \(v2[0-9.]*\).*|\1|p" "$src/CHANGELOG.md" | head -n1)"
pkg="github.com/jaegertracing/jaeger/internal/version"
ldflags="-s -w -X $pkg.latestVersion=${v2:-v$JAEGER_VERSION} -X $pkg.commitSHA=v$JAEGER_VERSION -X $pkg.date=$released"

mkdir -p "$OUT_DIR"
tmp="$(mktemp "$OUT_DIR/.jaeger.XXXXXX")"
trap 'rm -f "$tmp"' EXIT

echo ">> building jaeger v$JAEGER_VERSION (${v2:-unknown v2}) -> $OUT" >&2
start=$SECONDS
(cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$tmp" ./cmd/jaeger)
chmod 0755 "$tmp"
# Rename last so an interrupted build never leaves a half-written binary that
# the "already built" check above would trust.
mv -f "$tmp" "$OUT"
trap - EXIT
echo ">> built $OUT in $((SECONDS - start))s" >&2
echo "$OUT"
