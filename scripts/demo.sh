#!/usr/bin/env bash
# Set up, then run the main job end to end on this machine's CPU, offline: the demo pipeline.
#   data (the project's own generated stories, word problems and preference pairs) -> tokenizer ->
#   prepare -> pretrain -> eval -> SFT -> DPO -> RL (GRPO) -> verifier -> eval -> samples -> report
# About 13 minutes on a 2-core CPU (step budgets: the same table on every machine); runs/demo/report.md (and report.html) has the results.
# Running it again skips every stage already done with the same config.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh  # sourced: the environment it installs into (maybe .venv) stays active here
modernlm pipeline -c configs/pipeline/demo.yaml "$@"
