# Every target sets up .venv idempotently: it is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench lint clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pyro_vae demo --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py --estimators elbo meanfield iwae:K=50 dreg:K=50 --train-size 10000
	$(BIN)/python benchmarks/pyro_example_loop.py --epochs 1

lint: $(STAMP)
	$(BIN)/ruff check pyro_vae tests benchmarks examples

clean:
	rm -rf $(VENV) runs build *.egg-info
