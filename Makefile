# modeld: `make run` starts the daemon, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 1000
STATE ?= $(CURDIR)/state
CONFIG ?= config.example.toml

.PHONY: run test lint typecheck unit bench clean deps

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

deps: $(VENV)/.installed

run: deps
	$(BIN)/modeld serve --config $(CONFIG) --storage-dir $(STATE) --port $(PORT) --log-format console

lint: deps
	$(BIN)/ruff check .

typecheck: deps
	$(BIN)/mypy --strict supervisor actors

test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Benchmarks (not part of `make test`): needs nginx, aria2c and curl from Debian.
bench: deps
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && command -v aria2c >/dev/null 2>&1 \
	  || apt-get install -y nginx aria2 curl || { apt-get update && apt-get install -y nginx aria2 curl; }
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) state .pytest_cache .mypy_cache .ruff_cache *.egg-info
