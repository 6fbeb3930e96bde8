# ProbePolicy CRD, Helm chart, operator and agent images, kind end-to-end.
# Included by the top-level Makefile (docs/operator.md).
#
#   make crds-sync      copy crds/*.yaml into charts/flowprobe/crds/
#   make crds-check     fail if the chart's CRDs differ from crds/ (CI)
#   make helm-lint      helm lint --strict with every charts/flowprobe/ci/ scenario
#   make images         build the operator and agent images (docker, podman or buildah;
#                       skipped with a message when none works)
#   make e2e-kind       images + kind cluster + chart + sample app + spans in Jaeger
#   make operator-run   run the operator locally against $KUBECONFIG
#   make bench-operator one ProbePolicy on a local cluster of 200 kwok nodes and 5,000
#                       pods: time to Ready, operator CPU and RSS, 3 measurements with
#                       upstream's client rate limits in kcm and the scheduler, then 3 with
#                       those of Kubernetes' scale tests (docs/performance.md;
#                       BENCH_OPERATOR_ARGS="--nodes 20 --pods 500" for a quick run)

OPERATOR_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/../..)
OPERATOR_PYTHON ?= python3
OPERATOR_PYTHONPATH := $(OPERATOR_ROOT)/operator:$(OPERATOR_ROOT)/node_agent:$(OPERATOR_ROOT)/devtools$(if $(PYTHONPATH),:$(PYTHONPATH))
CHART_DIR := $(OPERATOR_ROOT)/charts/flowprobe
# Images are tagged with the chart's appVersion, which the chart deploys by default.
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' $(CHART_DIR)/Chart.yaml)
IMAGE_REPOSITORY ?= flowprobe
# The project venv's python when it exists (the bench imports kopf, kubernetes, pydantic).
BENCH_OPERATOR_PYTHON ?= $(if $(wildcard $(OPERATOR_ROOT)/.venv/bin/python),$(OPERATOR_ROOT)/.venv/bin/python,python3)
BENCH_OPERATOR_ARGS ?=
# operatorbench --client-limits profiles, one cluster each, and measurements per cluster.
BENCH_OPERATOR_LIMITS ?= upstream scale
BENCH_OPERATOR_REPEAT ?= 3
# Namespace for `make operator-run`.
OPERATOR_NAMESPACE ?= flowprobe-system

.PHONY: crds-sync crds-check helm-lint images e2e-kind operator-run bench-operator

crds-sync:
	rm -f $(CHART_DIR)/crds/*.yaml
	cp $(OPERATOR_ROOT)/crds/*.yaml $(CHART_DIR)/crds/

crds-check:
	@diff -r $(OPERATOR_ROOT)/crds $(CHART_DIR)/crds >/dev/null || { \
	  echo "charts/flowprobe/crds/ differs from crds/ (the source): run 'make crds-sync'" >&2; \
	  diff -r $(OPERATOR_ROOT)/crds $(CHART_DIR)/crds >&2; exit 1; }
	@echo "crds-check: charts/flowprobe/crds/ matches crds/"

helm-lint: crds-check
	@helm=$$(PYTHONPATH=$(OPERATOR_PYTHONPATH) $(OPERATOR_PYTHON) -c \
	  'from flowprobe.devenv import toolchain; print(toolchain.ensure_binary("helm"))') && \
	for values in $(CHART_DIR)/ci/*-values.yaml; do \
	  echo "helm lint --strict -f $${values#$(OPERATOR_ROOT)/}"; \
	  $$helm lint --strict $(CHART_DIR) -f $$values || exit 1; \
	done

images:
	IMAGE_REPOSITORY=$(IMAGE_REPOSITORY) IMAGE_TAG=$(IMAGE_TAG) \
	  bash $(OPERATOR_ROOT)/tools/container/build-images.sh

e2e-kind:
	IMAGE_REPOSITORY=$(IMAGE_REPOSITORY) IMAGE_TAG=$(IMAGE_TAG) bash $(OPERATOR_ROOT)/tools/e2e/kind.sh

operator-run:
	kubectl apply --server-side -f $(OPERATOR_ROOT)/crds/
	FLOWPROBE_NAMESPACE=$(OPERATOR_NAMESPACE) PYTHONPATH=$(OPERATOR_PYTHONPATH) \
	  $(OPERATOR_PYTHON) -m kopf run --module=flowprobe.controller --standalone \
	  --namespace=$(OPERATOR_NAMESPACE) --liveness=http://127.0.0.1:8080/healthz --verbose

bench-operator:
	@for limits in $(BENCH_OPERATOR_LIMITS); do \
	  PYTHONPATH=$(OPERATOR_PYTHONPATH) $(BENCH_OPERATOR_PYTHON) -m flowprobe.devenv.operatorbench \
	    --client-limits $$limits --repeat $(BENCH_OPERATOR_REPEAT) $(BENCH_OPERATOR_ARGS) || exit 1; \
	done
