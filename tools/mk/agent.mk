# The agent in a cluster (docs/agent-in-cluster.md). Included by the top-level Makefile.
#
#   make bench-enrich   the agent's Kubernetes caches with 10,000 pods and 2,000 services:
#                       cache memory, enrichment cost per exchange, relist time
#                       (BENCH_ENRICH_ARGS="--pods 1000 --services 200" for a quick run)

BENCH_ENRICH_ARGS ?=

.PHONY: bench-enrich

bench-enrich: deps native
	$(PY) -m flowprobe.devenv.enrichbench $(BENCH_ENRICH_ARGS)

# make demo-cluster   kubectl apply of a ProbePolicy -> spans in Jaeger: local control plane,
#                     operator, one agent for a kwok node whose pods are network namespaces
#                     (root; DEMO_CLUSTER_ARGS="--duration 60")
DEMO_CLUSTER_ARGS ?=

.PHONY: demo-cluster

demo-cluster: deps backends-tools cluster-tools
	$(PY) -m flowprobe.devenv.democluster $(DEMO_CLUSTER_ARGS)
