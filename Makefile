# Two commands for a newcomer:  make demo  (set up + run the default pipeline)  and  make test  (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup clean

$(BIN)/bsnn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/bsnn

setup: $(BIN)/bsnn

demo: setup
	$(BIN)/bsnn run --config configs/default.yaml --resume

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
