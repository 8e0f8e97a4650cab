# make demo        set up .venv from nothing, then run the bundled demo pipeline (embedded: no servers)
# make test        set up .venv with test extras, then lint and run the whole test suite
# make test-fast   the quick loop while editing: lint, then every test not marked slow or integration
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-fast lint venv clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH) 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/pip install --quiet -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import stillhouse.flows.cli, stillhouse.tasks, stillhouse.registry, torch, transformers, prefect, mlflow"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/stillhouse run configs/demo.yaml

# The browser test drives Debian's chromium (never `playwright install`, which downloads a browser).
chromium:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

# Ruff at line length 120 (pyproject.toml): formatting and lint failures fail the build.
lint: venv
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .

# Two workers (one per core); a test file's tests stay on one worker, so a module's servers start once.
test: venv chromium lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: venv lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow and not integration"

clean:
	rm -rf .stillhouse
