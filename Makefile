# Two commands from a fresh clone: `make demo` (the embedded default job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# A local CPU wheel of torch 2.13.0 where the machine has one (no multi-GB download), its
	# dependencies from the index; else torch from PyPI. (`--no-index` alone cannot work: torch's
	# own dependencies are not on local disk, so the wheel is taken first with --no-deps.)
	$(BIN)/pip install -q --no-index --no-deps torch==2.13.0 2>/dev/null && $(BIN)/pip install -q torch==2.13.0 \
		|| $(BIN)/pip install -q "torch>=2.2"
	$(BIN)/pip install -q -e ".[test,examples,lint,integrations]"
	# timm and torchvision for tests/test_integrations.py, without their dependencies (torchvision pins
	# its own torch release, which would replace the one above); the tests skip them if this fails.
	-$(BIN)/pip install -q --no-deps timm torchvision
	$(BIN)/python -c "import torch; print('torch', torch.__version__)"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m ntkfunc demo --out out

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check ntkfunc tests benchmarks examples
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) out
