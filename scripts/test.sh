#!/usr/bin/env bash
# Set up, then run the whole test suite: the fast default selection, then the slow end-to-end
# tests (tiny models on CPU). Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest "$@"
python3 -m pytest -m slow "$@" || [ $? -eq 5 ]  # 5: no slow test collected
