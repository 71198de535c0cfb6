# modeld: `make run` starts the daemon, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 1000
STATE ?= $(CURDIR)/state
CONFIG ?= config.example.toml

.PHONY: run test lint typecheck unit bench clean deps

$(BIN)/activate:
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(PYTHON) -m venv' failed: on Debian/Ubuntu install python3-venv first (sudo apt install python3-venv)" >&2; exit 1; }

# pip's output goes to a log, shown only when the install fails.
PIP_INSTALL = $(BIN)/python -m pip install --disable-pip-version-check --quiet

# `make run` needs the runtime only; `make test` adds the test tools.
$(VENV)/.runtime: pyproject.toml | $(BIN)/activate
	@echo "installing modeld into $(VENV) (log: $(VENV)/install.log)"
	@$(PIP_INSTALL) -e . > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log >&2; exit 1; }
	@touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	@echo "installing modeld and its test tools into $(VENV) (log: $(VENV)/install.log)"
	@$(PIP_INSTALL) -e '.[test]' > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log >&2; exit 1; }
	@touch $@ $(VENV)/.runtime

deps: $(VENV)/.installed

run: $(VENV)/.runtime
	$(BIN)/modeld serve --config $(CONFIG) --storage-dir $(STATE) --port $(PORT) --log-format console

lint: deps
	$(BIN)/ruff check .

typecheck: deps
	$(BIN)/mypy --strict supervisor actors

# Two pytest workers: most end-to-end tests wait on daemons and origins, not on the CPU. A test
# file stays on one worker (its module fixtures, e.g. one loaded Gemma, are made once).
test: lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# Benchmarks (not part of `make test`): needs nginx, aria2c and curl from Debian.
bench: deps
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && command -v aria2c >/dev/null 2>&1 \
	  || apt-get install -y nginx aria2 curl || { apt-get update && apt-get install -y nginx aria2 curl; }
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) state .pytest_cache .mypy_cache .ruff_cache *.egg-info
