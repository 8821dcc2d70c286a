PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WHEELHOUSE := $(VENV)/share/orchestrator/wheelhouse

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml $(wildcard jobs/*/requirements.txt)
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==26.3
	$(BIN)/pip install --quiet -e '.[dev,jobs]'
	@# The local target's "image": a wheelhouse with the example jobs' pinned requirements, so local
	@# VMs install them for real but offline (orchestrator/targets/localvm/image.py).
	$(BIN)/pip download --quiet --dest $(WHEELHOUSE) pip==26.3 $(foreach r,$(wildcard jobs/*/requirements.txt),-r $(r))
	@touch $(STAMP)

install: $(STAMP)

# The demo: the plan first, then a real job through the whole cycle on the built-in emulator
# (the real Azure SDK, an emulated VM reached over real SSH), then proof that nothing is left.
DEMO_STATE := $(CURDIR)/.orchestrator-demo
ORCH       := $(BIN)/orchestrator --state-dir $(DEMO_STATE)
DEMO_JOB   ?= jobs/mnist-cnn/job.yaml

demo: $(STAMP)
	$(ORCH) run $(DEMO_JOB) --dry-run --ssh-cidr 127.0.0.1/32
	@echo; echo "== orchestrator --target local run $(DEMO_JOB) =="
	$(ORCH) --target local run $(DEMO_JOB) --ssh-cidr 127.0.0.1/32 --env DATASET=digits --expect 'test_accuracy>=0.97'
	@echo; echo "== what is left (orchestrator status) =="
	$(ORCH) --target local status

test: $(STAMP)
	$(BIN)/ruff check orchestrator tests bench jobs
	$(BIN)/mypy
	$(BIN)/pytest -n auto   # one worker per core (pytest-xdist): most tests wait on processes and SSH

# The inner loop: everything but the slow tier (model training, whole multi-node cycles).
test-fast: $(STAMP)
	$(BIN)/ruff check orchestrator tests bench jobs
	$(BIN)/mypy
	$(BIN)/pytest -n auto -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check orchestrator tests bench jobs
	$(BIN)/ruff format --check orchestrator tests bench jobs
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/provision.py
	$(BIN)/python bench/sync.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/run_overhead.py
	$(BIN)/python bench/preflight.py
	$(BIN)/python bench/first_step.py
	$(BIN)/python bench/concurrency.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
