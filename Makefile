# tsmon — `make demo` runs the main job, `make test` runs every test CI needs. Both set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

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
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

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
	$(LOWEST)/bin/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) $(LOWEST) build *.egg-info .pytest_cache
