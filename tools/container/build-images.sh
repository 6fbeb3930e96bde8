#!/usr/bin/env bash
# Build the operator and agent images with the first container builder that
# works (a docker or podman CLI without a reachable daemon does not count).
# Exit 0 with "SKIPPED: ..." when there is none; FLOWPROBE_REQUIRE_IMAGES=1
# turns that into a failure (the kind e2e needs the images).
#
#   IMAGE_REPOSITORY=flowprobe IMAGE_TAG=0.1.0 tools/container/build-images.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
REPOSITORY=${IMAGE_REPOSITORY:-flowprobe}
TAG=${IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/charts/flowprobe/Chart.yaml")}

builder=""
reasons=()
for candidate in ${CONTAINER_BUILDER:-docker podman buildah}; do
  if ! command -v "$candidate" >/dev/null 2>&1; then
    reasons+=("$candidate: not installed")
    continue
  fi
  if [[ $candidate == buildah ]] || "$candidate" info >/dev/null 2>&1; then
    builder=$candidate
    break
  fi
  reasons+=("$candidate: installed but '$candidate info' fails (no daemon?)")
done

if [[ -z $builder ]]; then
  msg="images: SKIPPED: no usable container builder (${reasons[*]})"
  if [[ ${FLOWPROBE_REQUIRE_IMAGES:-0} == 1 ]]; then
    echo "${msg/SKIPPED/FAILED}" >&2
    exit 1
  fi
  echo "$msg"
  exit 0
fi

# BuildKit reads <Dockerfile>.dockerignore, which keeps the context small.
export DOCKER_BUILDKIT=1
for component in operator agent; do
  dir=operator
  [[ $component == agent ]] && dir=node_agent
  image="$REPOSITORY/$component:$TAG"
  echo "images: $builder build -f $dir/Dockerfile -t $image"
  "$builder" build -f "$ROOT/$dir/Dockerfile" -t "$image" "$ROOT"
done
