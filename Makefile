# `make train` / `make test` work from a bare machine: they create .venv and install aeforge into it.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# what training needs (make train), and that plus the dev tools: tests, ruff, sweeper, launcher (make test)
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev train test bench lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e .
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

# pytest empties --basetemp at the start of every run: a failed run's scratch (GB-sized checkpoints of the
# full-size smoke runs) never piles up; a passing test's tmp_path is removed at once (pyproject.toml)
BASETEMP := --basetemp=.pytest_tmp

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -m "not benchmark" $(BASETEMP) $(PYTEST_ARGS)

bench: $(DEV_STAMP)
	$(BIN)/python -m pytest -m benchmark $(BASETEMP) $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check aeforge tests scripts train.py

clean:
	rm -rf $(VENV) logs .pytest_cache .pytest_tmp
