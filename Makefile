# The two quick-start commands: `make demo` (set up, run the demo) and `make test` (set up, run every check).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spice-installed

.PHONY: setup demo test test-fast lint typecheck pytest bench

setup: $(STAMP)

# torch is pinned first: the CPU wheel 2.13.0 lies on this machine's disk, and an unpinned torch would
# pull a multi-GB CUDA build. The project's own range (pyproject) admits it, so pip installs nothing more.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/spice-trainer demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy spice_trainer

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
pytest: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test: lint typecheck pytest

# The fast lane for development: every test but the multi-process and end-to-end ones (`@pytest.mark.slow`),
# one torch thread. CI (`make test`, .ci/run) still runs everything.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -m fast; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
