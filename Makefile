# The two commands of the README: `make serve` (serve a detector, building what it needs) and
# `make test` (lint + the test suite). Both set up the virtual environment first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup serve test test-slow lint format

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[serve,train,dev]"
	touch $@

serve: setup
	$(BIN)/dede serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
