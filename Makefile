# Fresh machine: `make demo` runs the main job on a built-in default, `make test` runs the tests.
# Both create .venv and install what they need.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test test-oldest lint demo selfcheck install clean lock

install: $(STAMP)

# Installed at the versions in constraints.txt, so that a commit's CI result does not change when
# a dependency publishes a release; `make lock` re-resolves them from pyproject.toml's ranges.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[torch,test,prepared]"
	touch $(STAMP)

# Newest versions pyproject.toml allows, in a scratch venv, written to constraints.txt.
LOCK_VENV ?= .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(TORCH_PIN)"
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[torch,test,prepared]"
	{ sed -n '1,2p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable \
	  | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Test files run in TEST_WORKERS processes (pytest-xdist, one file per worker at a time, so a
# module's fixtures are built once): 2 workers took 654 s against 848 s serial on 2 cores. The
# longest files go first (tests/conftest.py: LONGEST_FIRST), in that order rather than xdist's
# (most tests first). --durations lists the slowest tests, to keep the suite within its budget.
TEST_WORKERS ?= 2
# How the suite runs, in `make test` and `make test-oldest` alike.
SUITE = -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: lint
	$(PY) $(SUITE) --durations=25

# The whole suite at the oldest versions pyproject.toml admits (constraints-oldest.txt, its
# floors), in a venv of its own: the floors are claims, and this is their test. Not part of
# `make test` (a second install, and CI's 15 minutes); run it when a floor changes, or code that
# older releases might not support. torch 2.4 is on PyPI only as a CUDA build: 6.1 GB in all.
OLDEST_VENV ?= .venv-oldest
test-oldest:
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet -c constraints-oldest.txt -e ".[torch,test,prepared]"
	$(OLDEST_VENV)/bin/python -m pip freeze --exclude-editable > $(OLDEST_VENV)/tested-versions.txt
	$(OLDEST_VENV)/bin/python $(SUITE)

# Generated videos -> pre-train the ViT -> train STAM and a frame-averaging baseline with
# run_train.py -> evaluate both with run_eval.py -> convert round trip -> pictures -> report.
DEMO_DIR ?= demo
demo: $(STAMP)
	$(PY) -m stam_jax.demo --workdir $(DEMO_DIR)

# Conversion and parity on a full-size official-format stam_16 (random weights) vs PyTorch.
selfcheck: $(STAMP)
	$(PY) -m convert.selfcheck --model stam_16

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .pytest_cache $(DEMO_DIR)
