# `make run` and `make test` do all set-up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config_example.yaml

.PHONY: setup run test lint bench deb clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/cnisup start --config $(CONFIG)

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# QUICK=1: every phase shortened (< 3 min); writes bench/results.json and docs/BENCHMARKS.md
bench: setup
	$(PY) -m bench.run $(if $(QUICK),--quick,)

# dist/cnisup_<version>_<arch>.deb; installs its own build dependencies (root). See packaging/deb/README.md.
deb:
	@bash packaging/deb/build.sh

lint: setup
	$(VENV)/bin/ruff check protocol supervisor workers tests bench
	@# mypy cannot follow the editable install's import hook: give it a tree named like the package.
	@mkdir -p build/typecheck/cnisup && for p in supervisor workers protocol; do ln -sfn ../../../$$p build/typecheck/cnisup/$$p; done
	cd build/typecheck && MYPYPATH=. ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p cnisup

clean:
	rm -rf $(VENV) build dist *.egg-info
