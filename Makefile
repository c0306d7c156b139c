# Thin wrappers: the real commands live in the `aiorch` CLI and pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ONNXRUNTIME_GPU_VERSION := 1.31.1
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast test-scale lint bench bench-soak bench-faults bench-gpu flower migrate clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision are pinned as a pair that installs from this machine's disk.
	$(PY) -m pip install -q -e '.[gpu,dev]'
	# mediapipe (the weight-free face mesh engine) without its declared deps: its numpy<2,
	# protobuf<5 and opencv-contrib-python pins are wrong for us (it runs on numpy 2 and
	# protobuf 6) and would downgrade numpy and replace OpenCV. Its real needs are in the gpu extra.
	$(PY) -m pip install -q --no-deps 'mediapipe==0.10.21'
	# On a machine with an NVIDIA GPU, the ONNX engines run on it: onnxruntime-gpu built for torch's
	# CUDA major (the GPU image's pin) in place of the CPU build; a GPU worker refuses to start
	# where it cannot load (inference/gpu_check.py).
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip uninstall -q -y onnxruntime && \
		$(PY) -m pip install -q 'onnxruntime-gpu==$(ONNXRUNTIME_GPU_VERSION)'; fi
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install aiorch with engines and dev tools

run: $(STAMP) ## migrate and start API, workers, scheduler and Flower on the embedded default
	$(VENV)/bin/aiorch up

test: $(STAMP) ## run the whole test suite against this machine's Postgres and RabbitMQ
	$(PY) -m pytest -q

test-fast: $(STAMP) ## unit tests only (no worker processes)
	$(PY) -m pytest -q -m "not integration"

test-scale: $(STAMP) ## worker hosts in network namespaces (root): host-loss tests, then 1/2/4-host speed-up
	$(PY) -m pytest -q tests/scale
	$(PY) -m bench.scale

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP) ## throughput and latency (Postgres+RabbitMQ, embedded), reads at 1M jobs, fair share; writes bench-results/
	$(PY) -m bench.run
	$(PY) -m bench.run --embedded
	$(PY) -m bench.reads
	$(PY) -m bench.fairness

bench-soak: $(STAMP) ## 30-minute soak at a steady mixed load: RSS, open fds, queue depths and p99 latencies over time
	$(PY) -m bench.soak

bench-faults: $(STAMP) ## broker and database restarts under 1,000 jobs (private RabbitMQ node and Postgres cluster): lost, twice, recovery
	$(PY) -m bench.faults

bench-gpu: $(STAMP) ## output encode costs, then GPU engines via a real worker vs the raw library call (CPU smoke run without CUDA)
	$(PY) -m bench.encode
	$(PY) -m bench.gpu

flower: $(STAMP) ## Flower on 127.0.0.1:5555 with basic auth
	$(VENV)/bin/aiorch flower

migrate: $(STAMP) ## upgrade the configured database to the latest schema
	$(VENV)/bin/aiorch migrate

clean: ## remove the virtualenv and ./var
	rm -rf $(VENV) var
