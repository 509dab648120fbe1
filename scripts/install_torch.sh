#!/usr/bin/env bash
# Install torch==VERSION into PYTHON's environment, the CPU build unless the machine has an NVIDIA GPU.
#   bash scripts/install_torch.sh PYTHON VERSION      (scripts/setup.sh and scripts/lock.sh call it)
#
# On PyPI, torch for Linux x86_64 is the CUDA build, which pulls ~3 GB of nvidia-* wheels. PyTorch's
# CPU index has VERSION+cpu, which pip prefers over VERSION when it sees both (a local version label
# sorts higher), so it is added as an extra index. Where that index cannot be reached (an offline
# mirror, as on this project's machines, which serve a CPU build) pip warns, then uses the configured
# index. A torch of VERSION already installed (e.g. your CUDA build) is kept. With an NVIDIA driver
# (`nvidia-smi` runs) PyPI's CUDA build is installed, unless TORCH_BUILD=cpu (scripts/lock.sh sets
# it: the lock is the CPU build's, without the CUDA build's nvidia-* wheels, on any machine).
# TORCH_INDEX_URL replaces the CPU index.
set -euo pipefail
python=$1 version=$2
if "$python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
  exit 0
fi
if [ "${TORCH_BUILD:-}" != cpu ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  echo "setup: installing torch==$version (an NVIDIA GPU is here: PyPI's CUDA build, with its nvidia-* wheels)"
  "$python" -m pip install -q "torch==$version"
else
  index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  echo "setup: installing torch==$version, the CPU build ($index, else the configured index)"
  # --no-deps: torch's own dependencies come from the lock (or, in scripts/lock.sh, the next
  # resolve); pip's retry warnings for an index out of reach are shown only if the install fails
  log=$(mktemp)
  if ! "$python" -m pip install -q --retries 1 --no-deps "torch==$version" --extra-index-url "$index" 2>"$log"; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
fi
