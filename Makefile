# `make demo` and `make test` work from a fresh clone with only Python 3.11 and the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz lint format bench fixtures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Pin torch first so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/ruff check src tests bench fixtures scripts
	$(BIN)/ruff format --check src tests bench fixtures scripts
	$(BIN)/python -m pytest -q

# Every reader fuzzer (tests marked `fuzz`) at 10,000 examples, each bounded in memory and time.
fuzz: $(STAMP)
	LORAMERGE_FUZZ=1 $(BIN)/python -m pytest -q -s -m fuzz \
		--hypothesis-show-statistics --durations=0

lint: $(STAMP)
	$(BIN)/ruff check src tests bench fixtures scripts
	$(BIN)/ruff format --check src tests bench fixtures scripts

format: $(STAMP)
	$(BIN)/ruff format src tests bench fixtures scripts
	$(BIN)/ruff check --fix src tests bench fixtures scripts

bench: $(STAMP)
	$(BIN)/python bench/merge.py --repeat 5 --json bench/results/merge.json

fixtures: $(STAMP)
	$(BIN)/python fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
