PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==26.3
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Until the SSH runner lands, the demo shows the plan, then provisions the smoke job for real on the
# built-in emulator (the real Azure SDK, across separate processes) and tears it down again.
DEMO_STATE := $(CURDIR)/.orchestrator-demo
ORCH       := $(BIN)/orchestrator --state-dir $(DEMO_STATE)

demo: $(STAMP)
	$(ORCH) run jobs/smoke/job.yaml --dry-run
	@echo; echo "== provision on the local emulator =="
	@$(ORCH) --target local --json provision jobs/smoke/job.yaml --ssh-cidr 127.0.0.1/32 > $(DEMO_STATE).json || \
		{ cat $(DEMO_STATE).json; exit 1; }
	@$(BIN)/python -c "import json,sys; ev=[json.loads(l) for l in open(sys.argv[1])]; \
		[print(f\"  {e['event']:18} {e.get('name', '')}\") for e in ev[:-1]]; d=ev[-1]; \
		print(f\"provisioned {d['run_id']} in {d['seconds']} s: \" + ', '.join(n['vm_name'] + ' ' + n['public_ip'] for n in d['nodes']))" $(DEMO_STATE).json
	@echo; echo "== what is left (gc --all --dry-run) =="
	@$(ORCH) --target local gc --all --dry-run
	@echo; echo "== down =="
	@$(ORCH) --target local down $$($(BIN)/python -c "import json,sys; print(json.loads(open(sys.argv[1]).readlines()[-1])['run_id'])" $(DEMO_STATE).json)
	@$(ORCH) --target local gc --all --dry-run
	@rm -f $(DEMO_STATE).json

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
