# blockdiff: the two commands of the README.
#   make demo   set up, then run the main job: convert the bundled tiny AR model with the WSD recipe (report at the end)
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/tiny-wsd

.PHONY: setup demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/blockdiff make-data --out runs/data
	$(BIN)/blockdiff convert --recipe recipes/tiny_wsd.toml --out $(RUN) --overwrite

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/train.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/moe.py

clean:
	rm -rf runs .cache
