#!/usr/bin/env bash
# Build flowprobe's OpenTelemetry Collector distribution (otelcol-flowprobe)
# with the OpenTelemetry Collector Builder from tools/otelcol/builder.yaml.
#
#   tools/build/otelcol.sh           # prints the binary path on stdout
#
# Output: $FLOWPROBE_CACHE/bin/otelcol-$OTELCOL_VERSION/otelcol-flowprobe
# (skipped if present). The builder itself is cached in
# $FLOWPROBE_CACHE/bin/ocb-$OTELCOL_VERSION/builder.
#
# No prebuilt collector distribution can be go-installed (otelcorecol and
# otelcontribcol carry local replace directives), hence the builder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../versions.env
source "$ROOT/tools/versions.env"

CACHE="${FLOWPROBE_CACHE:-$HOME/.cache/flowprobe}"
MANIFEST="$ROOT/tools/otelcol/builder.yaml"
NAME="otelcol-flowprobe"
OUT_DIR="$CACHE/bin/otelcol-$OTELCOL_VERSION"
OUT="$OUT_DIR/$NAME"

if [[ -x "$OUT" ]]; then
    echo "$OUT"
    exit 0
fi

# Component versions live in the manifest (contrib may use x.y.1 patch tags,
# so they cannot be rewritten blindly); refuse to build a binary whose cache
# path would lie about the core version it contains.
if ! grep -Eq "^[[:space:]]*-[[:space:]]*gomod:[[:space:]]*go\.opentelemetry\.io/collector/receiver/otlpreceiver v$OTELCOL_VERSION\$" "$MANIFEST"; then
    echo "error: $MANIFEST does not use core v$OTELCOL_VERSION (OTELCOL_VERSION in tools/versions.env); bump both together" >&2
    exit 1
fi

if ! command -v go >/dev/null 2>&1; then
    PATH="/usr/local/go/bin:$PATH"
fi
# The builder shells out to `go mod tidy` and `go build`, which inherit this.
# GOFLAGS is reset because -mod=readonly/vendor from the caller would break tidy.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS="-buildvcs=false"

BUILDER_DIR="$CACHE/bin/ocb-$OTELCOL_VERSION"
BUILDER="$BUILDER_DIR/builder"
start=$SECONDS
if [[ ! -x "$BUILDER" ]]; then
    echo ">> installing builder v$OTELCOL_VERSION -> $BUILDER" >&2
    GOBIN="$BUILDER_DIR" go install -trimpath "go.opentelemetry.io/collector/cmd/builder@v$OTELCOL_VERSION"
fi

# A fresh directory every time: the builder regenerates go.mod/main.go and a
# stale go.sum from an older attempt only confuses `go mod tidy`.
WORK="$CACHE/build/otelcol-$OTELCOL_VERSION"
rm -rf "$WORK"
mkdir -p "$WORK" "$OUT_DIR"

echo ">> building $NAME v$OTELCOL_VERSION -> $OUT" >&2
# The builder defaults to --skip-strict-versioning=true (v0.161.0); turn the
# check on so a misaligned component fails here rather than at runtime.
(cd "$WORK" && "$BUILDER" --config="$MANIFEST" --skip-strict-versioning=false)

tmp="$(mktemp "$OUT_DIR/.$NAME.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
cp "$WORK/dist/$NAME" "$tmp"
chmod 0755 "$tmp"
# Rename last so an interrupted build never leaves a half-written binary that
# the "already built" check above would trust.
mv -f "$tmp" "$OUT"
trap - EXIT
rm -rf "$WORK"
echo ">> built $OUT in $((SECONDS - start))s" >&2
echo "$OUT"
