# Every target bootstraps .venv on first use, so a fresh clone needs only python3, make and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench soak reliability lint typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py
	$(BIN)/python examples/agents.py
	$(BIN)/python examples/executions.py

lint: $(STAMP)
	$(BIN)/ruff check turnbuckle tests bench examples scripts
	$(BIN)/ruff format --check turnbuckle tests bench examples scripts

typecheck: $(STAMP)
	$(BIN)/mypy

# Spread over every core (work stealing: the long process tests do not queue behind each other).
test: lint typecheck
	$(BIN)/python -m pytest -q -n auto --dist worksteal

bench: $(STAMP)
	$(BIN)/python bench/tasks.py
	$(BIN)/python bench/sessions.py
	$(BIN)/python bench/runtime.py
	$(BIN)/python bench/executions.py

soak: $(STAMP)
	TURNBUCKLE_SOAK=1 $(BIN)/python -m pytest -q tests/reliability tests/sim tests/adapters/test_sqlite_sessions.py tests/adapters/test_sqlite_executions.py tests/actors/test_runtime_chaos.py

# The reliability report: the harnesses (CI sizes; TURNBUCKLE_SOAK=1 for large ones) record
# their figures, then RELIABILITY.md is rendered from them.
reliability: $(STAMP)
	rm -f .reliability-figures.jsonl
	TURNBUCKLE_FIGURES=$(CURDIR)/.reliability-figures.jsonl $(BIN)/python -m pytest -q -p no:cacheprovider tests/reliability tests/sim tests/adapters/test_sqlite_sessions.py tests/adapters/test_sqlite_executions.py tests/actors/test_runtime_chaos.py
	$(BIN)/python scripts/reliability_report.py .reliability-figures.jsonl RELIABILITY.md $(if $(TURNBUCKLE_SOAK),--soak,)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-tasks.db* demo-agents.db* demo-executions.db*
