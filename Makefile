# Quick start:  make serve   (installs everything, builds the demo model, serves it)
#               make test    (the same set-up, then the test suite)
#               make test-unit  (the same set-up, then the tests that start no process: minutes)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO := model_repository/tiny-qwen2/1
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: serve test test-unit setup system-deps venv proto demo-model bench clean

serve: setup demo-model
	$(VENV)/bin/pdserve --model-repository model_repository --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: setup demo-model
	$(PY) -m pytest -q tests

# The tiers are marked by tests/conftest.py from what each test uses.
test-unit: setup demo-model
	$(PY) -m pytest -q -m "not integration and not perf and not gpu" tests

setup: system-deps venv proto

# Debian packages: etcd (cluster membership), the libraries Mooncake's transfer engine
# loads, Prometheus (the dashboards test), and g++ (with gcc), which builds the engine's CPU
# kernels and its bind shim (engine/bind_host.c) at install (setup.py; engines never compile).
# apt runs only for what is missing.
SYSTEM_PACKAGES := etcd-server libibverbs1 librdmacm1 libnuma1 prometheus g++
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# torch first, pinned, so the project's torch range is met by the CPU build and pip
# does not pull a multi-GB CUDA build; then the protos (the package includes the
# generated server/pdserve/_proto); then the project with its test extras, its compiled
# kernels built against that torch (so without pip's build isolation, which would hide it).
KERNEL_SOURCES := setup.py server/pdserve/engine/kernels/variants.py server/pdserve/engine/kernels/csrc/*.cpp \
	server/pdserve/engine/bind_host.c
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml protos/*.proto protos/generate.py $(KERNEL_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "grpcio-tools>=1.80,<1.81" "protobuf>=6.31,<7"
	$(PY) protos/generate.py
	$(PIP) install -q --no-build-isolation -e '.[test,mooncake,bench]'
	touch $@

proto: $(VENV)/.installed
	$(PY) protos/generate.py

demo-model: $(DEMO)/model.safetensors
$(DEMO)/model.safetensors: tools/make_demo_model.py tools/train_demo_model.py $(VENV)/.installed
	$(PY) tools/make_demo_model.py $(DEMO) --train-steps 550 --train-hidden 128

bench: setup demo-model
	$(PY) bench/engine_throughput.py
	$(PY) bench/pd_vs_aggregated.py

clean:
	rm -rf $(VENV) server/pdserve/_proto $(DEMO) *.egg-info
