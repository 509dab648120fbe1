"""Layering rules, checked on the source: who may import what."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modernlm"


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


# The Hugging Face boundary: interop (hf.py) and LoRA finetuning of HF models (lora.py).
HF_MODULES = {"hf.py", "lora.py"}


def test_only_hf_modules_import_transformers_and_peft():
    for path in PACKAGE.rglob("*.py"):
        if path.name in HF_MODULES and path.parent == PACKAGE:
            continue
        bad = {n for n in imports(path) if n.split(".")[0] in ("transformers", "peft")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}; go through modernlm.hf or modernlm.lora"


def test_library_never_imports_commands():
    for path in PACKAGE.glob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        bad = {n for n in imports(path) if n.startswith("modernlm.commands")}
        assert not bad, f"{path.name} imports {bad}"


def test_top_level_modules_import_no_torch_at_module_level():
    for name in ("__init__.py", "cli.py", "config.py", "errors.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        top = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(n.split(".")[0] == "torch" for n in top), name
