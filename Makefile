# spellm-ds: `make test` sets up everything it needs (idempotent) and runs lint + the whole suite.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint format demo
setup:
	@bash scripts/setup_env.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The whole pipeline on a real small teacher (see examples/demo.py); DEMO_ARGS passes options through.
DEMO_ARGS ?=
demo: setup
	$(PY) -m examples.demo $(DEMO_ARGS)
