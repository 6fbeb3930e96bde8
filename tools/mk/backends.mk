# Local OTLP backends: Jaeger v2 + flowprobe's OpenTelemetry Collector +
# Prometheus (Debian package), all on 127.0.0.1. Included by the top-level
# Makefile; see docs/backends.md.
#
#   make backends-tools    build/cache jaeger and otelcol-flowprobe (no-op when cached)
#   make backends          run all three in the foreground until Ctrl-C
#   make backends BACKENDS_ARGS=--random-ports     (when 4317/16686/9090/... are taken)

PYTHON ?= python3
FLOWPROBE_CACHE ?= $(HOME)/.cache/flowprobe
# The build scripts and the Python launcher read it from the environment.
export FLOWPROBE_CACHE

# Extra arguments for `python -m flowprobe.devenv.backends`
# (--random-ports, --work-dir DIR, --scrape-interval 15s, --no-build).
BACKENDS_ARGS ?=

# Absolute repo root, from this file's location, so the fragment works from
# any including Makefile and with `make -C`.
BACKENDS_REPO := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/../..)

.PHONY: backends-tools backends

backends-tools:
	bash $(BACKENDS_REPO)/tools/build/jaeger.sh
	bash $(BACKENDS_REPO)/tools/build/otelcol.sh
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "prometheus not found: apt-get install -y prometheus" >&2; exit 1; }

backends: backends-tools
	PYTHONPATH="$(BACKENDS_REPO)/devtools$${PYTHONPATH:+:$$PYTHONPATH}" \
	  exec $(PYTHON) -m flowprobe.devenv.backends $(BACKENDS_ARGS)
