#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve the newest versions pyproject.toml's ranges allow (torch
# pinned to the CPU build's version below) in a throwaway virtual environment, and freeze them.
# Run it after changing a dependency in pyproject.toml, then run the tests on the new lock
# (`bash scripts/test.sh`) before committing it.
#   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_VERSION="2.13.0"  # the CPU build (scripts/install_torch.sh); GPU machines keep their own build
EXTRAS="hf,eval,dev,serve,harness,structured"   # what scripts/setup.sh installs
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
TORCH_BUILD=cpu bash scripts/install_torch.sh "$tmp/venv/bin/python" "$TORCH_VERSION"
# torch went in without its dependencies: this resolve adds them (an installed torch's requirements
# are resolved like any other), so the lock is complete: scripts/setup.sh installs it with --no-deps
"$tmp/venv/bin/python" -m pip install -q -e ".[$EXTRAS]"
"$tmp/venv/bin/python" -m pip check
{
  echo "# The exact versions scripts/setup.sh installs (pip install --no-deps -r requirements/lock.txt)."
  echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())') on $(uname -sm); do not edit by hand."
  echo "# pyproject.toml keeps version ranges for people who use modernlm as a library."
  # torch: the version without its local label (2.13.0+cpu satisfies ==2.13.0, and so does the
  # CUDA build a GPU machine already has). pip itself is the user's.
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable \
    | grep -v -E '^(pip|modernlm)==' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
