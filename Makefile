# make demo   set up .venv from nothing, then run the bundled demo pipeline (embedded: no servers)
# make test   set up .venv with test extras, then run the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test venv clean chromium

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

test: venv chromium
	$(BIN)/python -m pytest -q

clean:
	rm -rf .stillhouse
