#!/usr/bin/env bash
# `make e2e-kind`: flowprobe end to end on a kind cluster.
#
# Builds the operator and agent images, creates a kind cluster, loads the
# images, runs Jaeger v2 (in-memory), installs the chart with Jaeger as the
# default OTLP endpoint, deploys a small HTTP server and a client calling it,
# applies a ProbePolicy for their namespace and waits until Jaeger has spans
# for the server. Needs Docker (kind runs nodes as containers); without a
# reachable Docker daemon it prints why and exits 0.
#
# Environment: KIND_VERSION (built with `go install` if kind is not on PATH),
# E2E_CLUSTER (kind cluster name), E2E_KEEP=1 (keep the cluster), JAEGER_IMAGE,
# IMAGE_REPOSITORY / IMAGE_TAG (as for `make images`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${FLOWPROBE_CACHE:-$HOME/.cache/flowprobe}
KIND_VERSION=${KIND_VERSION:-$(sed -n "s/^KIND_VERSION=//p" "$ROOT/tools/versions.env")}
CLUSTER=${E2E_CLUSTER:-flowprobe-e2e}
JAEGER_IMAGE=${JAEGER_IMAGE:-cr.jaegertracing.io/jaegertracing/jaeger:2.15.0}
REPOSITORY=${IMAGE_REPOSITORY:-flowprobe}
TAG=${IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/charts/flowprobe/Chart.yaml")}
PY="env PYTHONPATH=$ROOT/operator:$ROOT/node_agent:$ROOT/devtools python3"

skip() {
  echo "e2e-kind: SKIPPED: $*"
  exit 0
}
step() { echo "e2e-kind: $*"; }

command -v docker >/dev/null 2>&1 || skip "docker is not installed (kind runs its nodes as containers)"
docker info >/dev/null 2>&1 || skip "docker is installed but 'docker info' fails: no reachable Docker daemon"

KIND=$(command -v kind || true)
if [[ -z $KIND ]]; then
  KIND=$CACHE/bin/kind-$KIND_VERSION/kind
  if [[ ! -x $KIND ]]; then
    step "building kind $KIND_VERSION from Go modules"
    GOBIN=$(dirname "$KIND") GOTOOLCHAIN=local CGO_ENABLED=0 go install "sigs.k8s.io/kind@v$KIND_VERSION"
  fi
fi
KUBECTL=$($PY -m flowprobe.devenv.toolchain path kubectl)
HELM=$($PY -c 'from flowprobe.devenv import toolchain; print(toolchain.ensure_binary("helm"))')

WORK=$(mktemp -d)
export KUBECONFIG=$WORK/kubeconfig
cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    step "FAILED; state for debugging:"
    "$KUBECTL" get probepolicies -o wide || true
    "$KUBECTL" get pods -A -o wide || true
    "$KUBECTL" -n flowprobe-system logs deploy/flowprobe-operator --tail=50 || true
    "$KUBECTL" -n flowprobe-system logs ds/flowprobe-agent --tail=50 || true
  fi
  if [[ ${E2E_KEEP:-0} == 1 ]]; then
    step "keeping cluster $CLUSTER (KUBECONFIG=$KUBECONFIG)"
  else
    "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT

step "building images $REPOSITORY/{operator,agent}:$TAG"
FLOWPROBE_REQUIRE_IMAGES=1 IMAGE_REPOSITORY=$REPOSITORY IMAGE_TAG=$TAG \
  CONTAINER_BUILDER=docker bash "$ROOT/tools/container/build-images.sh"

step "creating kind cluster $CLUSTER"
"$KIND" create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 180s
"$KIND" load docker-image --name "$CLUSTER" "$REPOSITORY/operator:$TAG" "$REPOSITORY/agent:$TAG"

step "starting Jaeger ($JAEGER_IMAGE)"
"$KUBECTL" create namespace observability
"$KUBECTL" apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: jaeger, namespace: observability}
spec:
  selector: {matchLabels: {app: jaeger}}
  template:
    metadata: {labels: {app: jaeger}}
    spec:
      containers:
        - name: jaeger
          image: $JAEGER_IMAGE
          ports: [{containerPort: 4317}, {containerPort: 4318}, {containerPort: 16686}]
---
apiVersion: v1
kind: Service
metadata: {name: jaeger, namespace: observability}
spec:
  selector: {app: jaeger}
  ports:
    - {name: otlp-grpc, port: 4317}
    - {name: otlp-http, port: 4318}
    - {name: query, port: 16686}
YAML
"$KUBECTL" -n observability rollout status deploy/jaeger --timeout=180s

step "installing the chart"
"$HELM" install flowprobe "$ROOT/charts/flowprobe" --namespace flowprobe-system --create-namespace \
  --set operator.image.repository="$REPOSITORY/operator" --set operator.image.tag="$TAG" \
  --set agent.image.repository="$REPOSITORY/agent" --set agent.image.tag="$TAG" \
  --set agent.defaultExport.endpoint=http://jaeger.observability:4317 \
  --wait --timeout 5m
"$HELM" test flowprobe --namespace flowprobe-system --timeout 2m

step "deploying the sample app (server + client, both from the agent image's Python)"
"$KUBECTL" create namespace demo
"$KUBECTL" label namespace demo flowprobe.io/capture=enabled
"$KUBECTL" apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: $REPOSITORY/agent:$TAG
          command: [python3, -m, http.server, "8080", --directory, /opt/flowprobe]
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{port: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: demo}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers:
        - name: client
          image: $REPOSITORY/agent:$TAG
          command:
            - python3
            - -c
            - |
              import time, urllib.request
              while True:
                  try:
                      urllib.request.urlopen("http://web.demo:8080/", timeout=5).read()
                  except OSError as exc:
                      print(exc, flush=True)
                  time.sleep(0.5)
YAML
"$KUBECTL" -n demo rollout status deploy/web deploy/client --timeout=180s

step "applying the ProbePolicy"
"$KUBECTL" apply -f - <<'YAML'
apiVersion: flowprobe.io/v1alpha1
kind: ProbePolicy
metadata: {name: demo}
spec:
  namespaceSelector: {matchLabels: {flowprobe.io/capture: enabled}}
  protocols: [HTTP]
  timeLimit: {durationSeconds: 3600}
YAML
"$KUBECTL" wait --for=condition=Ready probepolicy/demo --timeout=300s
"$KUBECTL" get probepolicy demo -o wide

step "waiting for spans in Jaeger"
"$KUBECTL" -n observability port-forward svc/jaeger 16686:16686 >/dev/null 2>&1 &
FORWARD=$!
trap 'kill $FORWARD 2>/dev/null || true; cleanup' EXIT
python3 - <<'PY'
import datetime, json, sys, time, urllib.parse, urllib.request

base = "http://127.0.0.1:16686/api/v3"
deadline = time.monotonic() + 300
last = "no answer yet"
while time.monotonic() < deadline:
    try:
        services = json.load(urllib.request.urlopen(f"{base}/services", timeout=5)).get("services") or []
        for service in services:
            if service.startswith("jaeger"):
                continue
            now = datetime.datetime.now(datetime.UTC)
            query = urllib.parse.urlencode({
                "query.service_name": service,
                "query.start_time_min": (now - datetime.timedelta(minutes=30)).isoformat(),
                "query.start_time_max": now.isoformat(),
            })
            result = json.load(urllib.request.urlopen(f"{base}/traces?{query}", timeout=10))
            spans = [s for rs in result.get("result", {}).get("resourceSpans", [])
                     for ss in rs.get("scopeSpans", []) for s in ss.get("spans", [])]
            if spans:
                print(f"e2e-kind: OK: {len(spans)} span(s) for service {service!r}, e.g. {spans[0].get('name')!r}")
                sys.exit(0)
        last = f"services so far: {services}"
    except OSError as exc:
        last = str(exc)
    time.sleep(5)
print(f"e2e-kind: no spans arrived in Jaeger within 5 minutes ({last})", file=sys.stderr)
sys.exit(1)
PY
