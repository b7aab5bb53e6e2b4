# Overage — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test install migrate seed bench bench-ingest bench-portal bench-freshness bench-close clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

migrate: install
	$(BIN)/python manage.py migrate --noinput

seed: migrate
	$(BIN)/python manage.py seed_demo

## Install, migrate, load the demo business and serve on http://$(HOST):$(PORT)/
run: seed
	$(BIN)/python manage.py runserver $(HOST):$(PORT)

## Run the whole test suite (SQLite by default; DATABASE_URL=postgres://… for PostgreSQL)
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Benchmarks: print a table and write bench/results/*.json (issue 6's figures; ~40 min, ~7 GB of PostgreSQL)
bench: install
	bash .ci/services-up
	$(BIN)/python bench/ingest.py --soak-seconds 300
	$(BIN)/python bench/portal.py --events 10000000
	$(BIN)/python bench/freshness.py
	$(BIN)/python bench/close.py

bench-ingest: install
	$(BIN)/python bench/ingest.py

bench-portal: install
	$(BIN)/python bench/portal.py

bench-freshness: install
	$(BIN)/python bench/freshness.py

bench-close: install
	$(BIN)/python bench/close.py

clean:
	rm -rf $(VENV) db.sqlite3 .pytest_cache
