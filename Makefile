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

# The installer's output goes to a log, shown only when the install fails. uv installs in about
# 15 s what pip takes 70 s for; pip is the fallback where uv cannot be had or cannot reach the
# index (uv does not read pip.conf).
PIP_INSTALL = $(BIN)/python -m pip install --disable-pip-version-check --quiet
define install
	@echo "installing $(2) into $(VENV) (log: $(VENV)/install.log)"
	@{ $(PIP_INSTALL) uv && $(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -e '$(1)'; } \
	  > $(VENV)/install.log 2>&1 \
	  || $(PIP_INSTALL) -e '$(1)' >> $(VENV)/install.log 2>&1 \
	  || { cat $(VENV)/install.log >&2; exit 1; }
endef

# `make run` needs the runtime only; `make test` adds the test tools.
$(VENV)/.runtime: pyproject.toml | $(BIN)/activate
	$(call install,.,modeld)
	@touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(call install,.[test],modeld and its test tools)
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
# Bytecode caches are written even where PYTHONDONTWRITEBYTECODE is set: without them every
# pytest worker compiles and assertion-rewrites its modules again (15 s of collection, not 3 s).
test: lint typecheck
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# Benchmarks (not part of `make test`): needs nginx, aria2c and curl from Debian.
bench: deps
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && command -v aria2c >/dev/null 2>&1 \
	  || apt-get install -y nginx aria2 curl || { apt-get update && apt-get install -y nginx aria2 curl; }
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) state .pytest_cache .mypy_cache .ruff_cache *.egg-info
