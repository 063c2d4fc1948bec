# `make run` and `make test` do all set-up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config_example.yaml
TYPECHECK := build/typecheck

.PHONY: setup run test test-fast lint bench deb clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/cnisup start --config $(CONFIG)

# Everything: what CI runs (root-only tests skip elsewhere, with the reason).
test: setup
	$(PY) -m pytest -ra --durations=25 $(PYTEST_ARGS)

# Day-to-day: the unit-level subset, seconds, no root needed.
test-fast: setup
	$(PY) -m pytest -ra tests/unit $(PYTEST_ARGS)

# QUICK=1: every phase shortened (about 2 min); writes bench/results.json and docs/BENCHMARKS.md
bench: setup
	$(PY) -m bench.run $(if $(QUICK),--quick,)

# dist/cnisup_<version>_<arch>.deb; installs its own build dependencies (root). See packaging/deb/README.md.
deb:
	@bash packaging/deb/build.sh

lint: setup
	$(VENV)/bin/ruff check protocol supervisor workers tests bench
	@# mypy cannot follow the editable install's import hook: give it a tree named like the package.
	@mkdir -p $(TYPECHECK)/cnisup && for p in supervisor workers protocol; do ln -sfn ../../../$$p $(TYPECHECK)/cnisup/$$p; done
	cd $(TYPECHECK) && MYPYPATH=. ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p cnisup
	@# Tests import their helpers by module name (pytest puts each test dir on sys.path).
	cd tests && MYPYPATH=../$(TYPECHECK) ../$(VENV)/bin/mypy --config-file ../pyproject.toml --explicit-package-bases .
	MYPYPATH=$(TYPECHECK):tests $(VENV)/bin/mypy --config-file pyproject.toml --explicit-package-bases bench

clean:
	rm -rf $(VENV) build dist *.egg-info
