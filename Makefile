PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Until the SSH runner lands (issue 3) the demo shows the whole plan and provisions and tears down
# on the built-in emulator with the real Azure SDK.
demo: $(STAMP)
	$(BIN)/orchestrator run jobs/smoke/job.yaml --dry-run
	$(BIN)/orchestrator provision jobs/smoke/job.yaml --dry-run --json >/dev/null && echo "dry-run JSON: ok"

test: $(STAMP)
	$(BIN)/ruff check orchestrator tests bench
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check orchestrator tests bench
	$(BIN)/ruff format --check orchestrator tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/provision.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
