#!/usr/bin/env bash
# Set everything up and run the main job: a venv (.venv), PyTorch's CPU build, gpt2-onnx with its export extra, an
# export of GPT-2 to models/ (the real gpt2 from the Hugging Face hub; without the hub, the embedded default: a
# random-weight GPT-2-small with the GPT-2 tokenizer shipped in the package), then a generation from it.
#
#   bash run.sh ["PROMPT" [gpt2-generate options ...]]     (default prompt: "Artificial intelligence")
#
# Safe to run again: it reuses the venv and the bundle it made. PYTHON picks the interpreter (default python3);
# TORCH_INDEX_URL the index of PyTorch's CPU wheels (default https://download.pytorch.org/whl/cpu, used when it
# answers; else pip's own configuration decides).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
export PIP_DISABLE_PIP_VERSION_CHECK=1
say() { echo "run.sh: $*" >&2; }

if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # PyPI's torch wheel for Linux is the multi-GB CUDA build; the CPU build lives on PyTorch's own index.
  torch_index=()
  if .venv/bin/python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=5)" \
      "$TORCH_INDEX_URL/torch/" 2>/dev/null; then
    torch_index=(--extra-index-url "$TORCH_INDEX_URL")
  fi
  say "installing PyTorch (CPU build)"
  .venv/bin/pip install -q "${torch_index[@]}" torch==2.13.0
fi
say "installing gpt2-onnx with its export extra"
.venv/bin/pip install -q -e '.[export,cpu]'

if .venv/bin/python -m gpt2onnx.export.hub; then
  bundle=models/gpt2
  [ -f "$bundle/bundle.json" ] || .venv/bin/export-gpt2 --model gpt2 --output "$bundle"
else
  say "the Hugging Face hub cannot be reached: using the embedded default, a random-weight GPT-2-small (its text is gibberish) with the GPT-2 tokenizer"
  bundle=models/random-small
  [ -f "$bundle/bundle.json" ] || .venv/bin/export-gpt2 --random-init small --output "$bundle"
fi

if [ $# -eq 0 ]; then
  set -- "Artificial intelligence"
fi
.venv/bin/gpt2-generate "$@" --model "$bundle" --show-tokens --max-new-tokens 30
