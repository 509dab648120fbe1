#!/usr/bin/env bash
# Set up, then run the whole test suite: the fast default selection, then the slow end-to-end
# tests (tiny models on CPU). Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh  # sourced: the environment it installs into (maybe .venv) stays active here
python -m pytest "$@"
python -m pytest -m slow "$@" || [ $? -eq 5 ]  # 5: no slow test collected
