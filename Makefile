# The two commands of the README: `make demo` and `make test`. Both work on a fresh clone of a fresh
# Debian machine: `services` installs and starts what they use (ops/ensure-services.sh), `install`
# builds .venv from the hash-pinned lock file, and `scopemeter stack up` (or the tests' fixtures)
# start Mosquitto and Apache Kafka (fetched once from Maven Central, pinned by ops/kafka/).
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: install services demo test lint bench clean lock mutate

$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U 'pip>=24'
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

# Debian packages, PostgreSQL (started, with the project's role), Kafka's jars, the TimescaleDB test server.
services: install
	bash ops/ensure-services.sh
	$(BIN)/python -c 'from ops.kafka_broker import kafka_libs; print("kafka jars:", kafka_libs())'

demo: install services
	$(BIN)/scopemeter demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: install services lint
	$(BIN)/pytest

# Mutation testing of the safety-critical modules, one at a time with their own fast tests (slow: not in
# CI). Prints the kill rate per module; MODULES="edge/counters.py ..." runs only those.
mutate: install services
	$(BIN)/python -m ops.mutate $(MODULES)

# After changing dependencies in pyproject.toml: re-pin every package with its hashes.
lock: install
	$(BIN)/pip-compile -q --extra edge --extra server --extra dev --generate-hashes --allow-unsafe \
		--strip-extras -o requirements.lock pyproject.toml

clean:
	-$(BIN)/scopemeter stack down
	rm -rf .scopemeter
