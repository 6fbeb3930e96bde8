#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager and kube-scheduler from the
# k8s.io/kubernetes Go module into $FLOWPROBE_CACHE/bin/kube-$KUBE_VERSION/.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod requires every staging
# module (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and relies on replace
# directives that only apply inside its own repository. tools/gomod/kube is a
# tiny module whose replace block maps each staging module to its published
# v0.X.Y tag and whose `tool` block keeps the requirements alive under
# `go mod tidy`. Its go.sum is committed so builds are reproducible.
#
# Usage: tools/build/kube.sh            build if missing (no-op when cached)
#        tools/build/kube.sh --regen    rewrite tools/gomod/kube for KUBE_VERSION
# The module is regenerated automatically when KUBE_VERSION no longer matches it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tools/versions.env
source "$ROOT/tools/versions.env"

CACHE=${FLOWPROBE_CACHE:-$HOME/.cache/flowprobe}
OUT=$CACHE/bin/kube-$KUBE_VERSION
MOD=$ROOT/tools/gomod/kube
BINS=(kube-apiserver kube-controller-manager kube-scheduler)
REGEN=0
[[ ${1:-} == --regen ]] && REGEN=1

have_all() {
  local b
  for b in "${BINS[@]}"; do [[ -x $OUT/$b ]] || return 1; done
}

if [[ $REGEN == 0 ]] && have_all; then
  echo "kube $KUBE_VERSION: cached in $OUT"
  exit 0
fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
# local: a k8s release needing a newer Go must fail here, not download a toolchain.
# GOWORK=off: a go.work in a parent directory must not change what gets built.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS=-buildvcs=false

mkdir -p "$CACHE/bin"
# Parallel callers (make and a pytest session) must not link into the same dir.
exec 9>"$CACHE/bin/.kube-$KUBE_VERSION.lock"
flock 9
if [[ $REGEN == 0 ]] && have_all; then
  echo "kube $KUBE_VERSION: cached in $OUT"
  exit 0
fi

SV=0.${KUBE_VERSION#1.}        # staging modules are tagged v0.<minor>.<patch>
MINOR=${KUBE_VERSION#1.}; MINOR=${MINOR%%.*}
CMDS=()
for b in "${BINS[@]}"; do CMDS+=("k8s.io/kubernetes/cmd/$b"); done

regen() {
  echo "kube $KUBE_VERSION: regenerating $MOD"
  mkdir -p "$MOD"
  cd "$MOD"
  rm -f go.mod go.sum
  "$GO" mod init flowprobe.invalid/tools/kube >/dev/null 2>&1
  local gomod gover godebug m
  gomod=$(GOFLAGS=-mod=mod "$GO" mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # k8s' go/godebug lines decide GODEBUG defaults of the binaries: copy them.
  gover=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")
  godebug=$(sed -n 's/^godebug \(.*\)$/\1/p' "$gomod")
  "$GO" mod edit -go="$gover"
  [[ -n $godebug ]] && "$GO" mod edit -godebug="$godebug"
  # Replaces must exist before the first `go get`, else "unknown revision v0.0.0".
  while read -r m; do
    "$GO" mod edit -replace="$m=$m@v$SV"
  done < <(sed -n 's/^\t\(k8s\.io\/[^ ]*\) v0\.0\.0$/\1/p' "$gomod")
  local tools=()
  for m in "${CMDS[@]}"; do tools+=("$m@v$KUBE_VERSION"); done
  GOFLAGS=-mod=mod "$GO" get -tool "${tools[@]}"
  GOFLAGS=-mod=mod "$GO" mod tidy
}

if [[ $REGEN == 1 ]] || ! grep -Eq "^(require)?[[:space:]]+k8s\.io/kubernetes v$KUBE_VERSION( |\$)" "$MOD/go.mod" 2>/dev/null; then
  regen
fi

# Without these the server reports v0.0.0-master+$Format:%H$ and Helm's
# kubeVersion checks (and any client parsing the version) break.
LDF="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDF+=" -X $p.gitVersion=v$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$MINOR"
  LDF+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

TMP=$(mktemp -d "$CACHE/bin/.kube-build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "kube $KUBE_VERSION: building ${BINS[*]} (~25 min on 2 cores with a cold Go cache, ~30 s warm)"
start=$SECONDS
(cd "$MOD" && "$GO" build -mod=readonly -trimpath -ldflags "$LDF" -o "$TMP/" "${CMDS[@]}")
mkdir -p "$OUT"
for b in "${BINS[@]}"; do mv -f "$TMP/$b" "$OUT/$b"; done
echo "kube $KUBE_VERSION: built in $((SECONDS - start)) s into $OUT"
