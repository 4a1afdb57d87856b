# tsmon — `make demo` runs the main job, `make test` runs every test CI needs. Both set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
# test worker processes (pytest-xdist), a test file per worker at a time; 0 runs the tests in this process
TEST_WORKERS ?= 2
PYTEST := -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo test test-fast test-lowest venv clean

venv: $(STAMP)

# torch first and pinned (the fast CPU build on this machine, a normal release elsewhere), then the
# project: its own `torch>=2.2` requirement is already met, so pip never pulls a second torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tsmon demo

test: $(STAMP)
	$(PY) $(PYTEST)

test-fast: $(STAMP)
	$(PY) $(PYTEST) -m "not slow"

# every runtime dependency at the lowest version pyproject.toml allows (constraints/lowest.txt), in a venv of its
# own, then every test not marked slow: a floor that does not work fails here (not part of `make test`: ~9 minutes)
LOWEST := .venv-lowest
test-lowest:
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q "$(TORCH)"
	$(LOWEST)/bin/python -m pip install -q -c constraints/lowest.txt -e ".[dev]"
	$(LOWEST)/bin/python -m pip check
	$(LOWEST)/bin/python $(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) $(LOWEST) build *.egg-info .pytest_cache
