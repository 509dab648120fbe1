"""Layering rules, checked on the source: who may import what, and no import circle anywhere.

The packages, bottom to top (a layer imports only from layers below it and from itself):

    core       errors files config runtime model tokenizer checkpoint generation (top-level modules)
    hf.convert Llama <-> modernlm (the only place, with hf.lora, that imports transformers / peft)
    data       corpus sources, token shards, task datasets, the synthetic world
    train      the trainer, optimizers, losses, tracking
    eval       perplexity, task evaluation, metrics, the sinks measurements, comparisons
    hf.lora    LoRA finetuning (PEFT) on the trainer, with task evaluation
    align      SFT, DPO, the verifier
    api        `modernlm.load`: the facade every command and server shares
    serve      the OpenAI-compatible server: its continuous-batching engine, the API's shapes, the app
    harness    lm-evaluation-harness: the harness model "modernlm", task runs, offline task YAMLs
    pipeline   the stage runner, the report, plots
    commands   one thin module per CLI command (cli.py finds them by name, never by import)
    package    modernlm/__init__.py: `from modernlm import load, ModernDecoderLM, ModelConfig`; it names
               the facade, so it sits on top (lazily, through a module __getattr__, so that importing
               any submodule, or `modernlm --help`, never loads the facade or torch)

Function-level (lazy) imports count as much as module-level ones: a lazy import hides a dependency,
it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modernlm"

CORE = {"errors", "files", "config", "runtime", "model", "tokenizer", "checkpoint", "generation", "cli",
        "__main__"}  # fmt: skip
LAYERS = ["core", "hf.convert", "data", "train", "eval", "hf.lora", "align", "api", "serve", "harness", "pipeline",
          "commands", "package"]


def module_name(path: Path) -> str:
    """src/modernlm/data/corpus.py -> 'data.corpus'; data/__init__.py -> 'data'."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    if module == "__init__":
        return "package"
    top = module.split(".")[0]
    if top in CORE:
        return "core"
    if top == "hf":
        return "hf.lora" if module == "hf.lora" else "hf.convert"
    return top


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from modernlm.data import tasks`
    return names


def internal_imports(path: Path) -> set[str]:
    """The modernlm modules `path` imports ('data.tasks', 'model', ...)."""
    out = set()
    for name in imports(path):
        if name.startswith("modernlm."):
            name = name.removeprefix("modernlm.")
            while name and name not in MODULES:  # `modernlm.model.ModelConfig` -> 'model'
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def test_every_module_has_a_layer():
    unknown = {m for m in MODULES if layer(m) not in LAYERS}
    assert not unknown, f"modules outside the layering (add their package to LAYERS): {unknown}"


def test_imports_run_down_the_layers():
    bad = []
    for module, path in MODULES.items():
        mine = LAYERS.index(layer(module))
        for dep in internal_imports(path):
            if LAYERS.index(layer(dep)) > mine:
                bad.append(f"{module} ({layer(module)}) imports {dep} ({layer(dep)})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_model_knows_nothing_of_checkpoints_generation_or_training():
    assert internal_imports(MODULES["model"]) <= {"errors", "config"}


def test_no_import_circle():
    graph = {m: {d for d in internal_imports(p) if d != m} for m, p in MODULES.items()}
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}  # a package's own __init__
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_only_hf_modules_import_transformers_and_peft():
    for module, path in MODULES.items():
        if module.startswith("hf."):
            continue
        bad = {n for n in imports(path) if n.split(".")[0] in ("transformers", "peft")}
        assert not bad, f"{module} imports {bad}; go through modernlm.hf"


def test_library_never_imports_commands():
    for module, path in MODULES.items():
        if layer(module) == "commands" or module in ("cli", "__main__"):
            continue
        bad = {n for n in imports(path) if n.startswith("modernlm.commands")}
        assert not bad, f"{module} imports {bad}"


def test_top_level_modules_import_no_torch_at_module_level():
    for name in ("__init__.py", "cli.py", "config.py", "errors.py", "files.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        top = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(n.split(".")[0] == "torch" for n in top), name
