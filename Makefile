# Fresh machine: `make demo` runs the main job on a built-in default, `make test` runs the tests.
# Both create .venv and install what they need.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test lint demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[torch,test]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# Until the training/evaluation demo lands: prove conversion and parity on a full-size
# official-format stam_16 (random weights) against the PyTorch reference, end to end.
demo: $(STAMP)
	$(PY) -m convert.selfcheck --model stam_16

clean:
	rm -rf $(VENV) .pytest_cache
