# The two commands of the README: `make demo` and `make test`. Both work on a fresh clone.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: install services demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[edge,server,embedded,dev]'
	touch $@

install: $(BIN)/.installed

# System services the project uses but does not vendor: PostgreSQL (running) and the mosquitto binary.
services:
	bash ops/ensure-services.sh

demo: install services
	$(BIN)/scopemeter demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install services lint
	$(BIN)/pytest

clean:
	-$(BIN)/scopemeter stack down
	rm -rf .scopemeter
