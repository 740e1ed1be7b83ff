# Two commands a newcomer needs: `make serve` (set up, then run the main job) and `make test` (set up, then test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?=
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch==2.13.0 first when no torch is present: on this machine it is a CPU wheel already on disk; users with a GPU
# keep whatever torch build they installed (pyproject asks only torch>=2.4).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The main job: the OpenAI-compatible server on http://$(HOST):$(PORT)/v1, serving the bundled model
# (or MODEL=<library name or checkpoint directory>).
serve: setup
	$(BIN)/llmasos serve --host $(HOST) --port $(PORT) $(if $(MODEL),--model "$(MODEL)")

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check llmasos tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
