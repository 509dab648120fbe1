"""The import graph, checked on the source: who may import whom, who owns each optional dependency.

`ALLOWED` is the graph, written down once (README's Architecture paragraph draws it). A node is a
core module (the top-level modules, each with its own edges) or a package; a module may import
modules of its own node and of the nodes its node names. Also checked: no import circle anywhere;
each optional dependency imported only by its owners (`OWNERS`); no private name (`_x`) imported
from another module; no `from modernlm import ...` inside the library (import the module that
defines the name); and in a module that imports torch at the top, no function-level import except
of an optional dependency (a lazy import there keeps nothing fast, it only hides the graph).
Function-level imports count as edges as much as module-level ones. The last tests feed each rule
a temporary module that breaks it (a test of the test).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modernlm"

# Core modules, bottom to top; each names the core modules it may import.
CORE_EDGES = {
    "kernels": set(),  # kernels/: the C++ decoding ops; torch only
    "errors": set(),
    "files": {"errors"},
    "config": {"errors", "files"},
    "runtime": {"errors"},
    "chat": {"errors"},
    "model": {"errors", "config", "kernels"},
    "quant": {"errors", "kernels", "runtime"},  # the Q8_0 / Q4_1 layers, prepare(model, quantize)
    "tokenizer": {"errors", "files", "chat"},
    "checkpoint": {"errors", "files", "config", "model", "quant", "tokenizer"},
    "gguf_weights": {"model", "quant", "runtime", "tokenizer"},  # a .gguf's blocks into QLinear, its tokenizer
    "constrain": {"errors"},  # constrained decoding: llguidance's matchers, a token mask per row
    "steps": {"model", "runtime"},  # compiled decode steps at static shapes (CUDA graphs on a GPU)
    "generation": {"errors", "runtime", "model", "tokenizer", "constrain", "steps"},
    "perplexity": {"errors"},
    "textmodel": {"errors", "runtime", "generation"},
    "cli": {"errors", "files", "config"},
    "__main__": {"cli"},
}
CORE = set(CORE_EDGES)
CORE_LIBRARY = CORE - {"cli", "__main__"}

# Packages (and the facade, `api`); each names the nodes it may import.
ALLOWED = dict(CORE_EDGES) | {
    "hf": CORE_LIBRARY,  # hf/convert.py, hf/text.py: transformers <-> ours; hf/gguf_export.py: ours -> llama.cpp
    "api": CORE_LIBRARY | {"hf"},  # modernlm.load
    "data": CORE_LIBRARY,
    "train": CORE_LIBRARY,
    "eval": CORE_LIBRARY | {"data", "api", "hf"},
    "hf.lora": CORE_LIBRARY | {"hf", "train"},  # LoRA finetuning on the trainer
    "align": CORE_LIBRARY | {"data", "train", "eval"},
    "serve": CORE_LIBRARY,
    "pipeline": CORE_LIBRARY | {"data", "train", "eval", "align", "api"},
    "commands": CORE | {"hf", "api", "data", "train", "eval", "hf.lora", "align", "serve", "pipeline", "commands"},
    "package": {"api", "model", "generation"},  # modernlm/__init__.py: `from modernlm import load, ...`
}

# Optional dependencies and the modules (or packages) that alone may import them.
OWNERS = {
    "transformers": {"hf"},
    "peft": {"hf"},
    "datasets": {"data.readers", "eval.tasks"},
    "fastapi": {"serve", "commands.serve"},
    "starlette": {"serve", "commands.serve"},
    "uvicorn": {"serve", "commands.serve"},
    "prometheus_client": {"serve", "commands.serve"},
    "lm_eval": {"eval.tasks"},
    "matplotlib": {"pipeline.plotting"},
    "tensorboard": {"train.tracking"},
    "gguf": {"gguf_weights", "hf.gguf_export"},  # the reader and the writer of .gguf files
    "llguidance": {"constrain"},  # the grammar library of constrained decoding
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """src/modernlm/data/corpus.py -> 'data.corpus'; data/__init__.py -> 'data'."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def node(module: str) -> str:
    if module == "__init__":
        return "package"
    top = module.split(".")[0]
    if top in CORE:
        return top
    if top == "hf":
        return "hf.lora" if module == "hf.lora" else "hf"
    return top


def owned_by(module: str, owners: set[str]) -> bool:
    return any(module == o or module.startswith(o + ".") for o in owners)


def import_nodes(path: Path) -> list[tuple[ast.AST, bool]]:
    """Every import statement of a file, with whether it sits inside a function ("lazy"). An import
    inside `try:` (a dependency that may be missing, e.g. `resource` on Windows) counts as lazy
    only for the graph: it is where it has to be."""
    return [(n, lazy) for n, lazy, _ in import_statements(path)]


def import_statements(path: Path) -> list[tuple[ast.AST, bool, bool]]:
    """(import, inside a function, inside a try block) for every import statement of a file."""
    out = []

    def walk(n: ast.AST, in_function: bool, in_try: bool) -> None:
        for child in ast.iter_child_nodes(n):
            if isinstance(child, ast.Import | ast.ImportFrom):
                out.append((child, in_function, in_try))
            walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef),
                 in_try or isinstance(child, ast.Try))  # fmt: skip

    walk(ast.parse(path.read_text()), False, False)
    return out


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (absolute names)."""
    names = set()
    for n, _ in import_nodes(path):
        if isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
        elif n.module:
            names.add(n.module)
            names |= {f"{n.module}.{a.name}" for a in n.names}  # `from modernlm.data import tasks`
    return names


def internal_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modernlm modules `path` imports ('data.tasks', 'model', ...)."""
    out = set()
    for name in imports(path):
        if name.startswith("modernlm."):
            name = name.removeprefix("modernlm.")
            while name and name not in modules:  # `modernlm.model.ModelConfig` -> 'model'
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def top_level_torch(path: Path) -> bool:
    return any(
        not lazy and (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "torch" for a in n.names)
                      or isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "torch")
        for n, lazy in import_nodes(path)
    )  # fmt: skip


def optional_dependency(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] in OWNERS:
        return parts[0]
    return "tensorboard" if "tensorboard" in parts else None  # torch.utils.tensorboard


# ---- the rules: each returns its violations as lines -------------------------------------------------


def unplaced(modules: dict[str, Path]) -> list[str]:
    return [f"{m}: no node in the graph (add it to ALLOWED)" for m in modules if node(m) not in ALLOWED]


def edges_against_the_graph(modules: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in modules.items():
        mine = node(module)
        for dep in internal_imports(path, modules):
            if node(dep) != mine and node(dep) not in ALLOWED.get(mine, set()):
                bad.append(f"{module} ({mine}) imports {dep} ({node(dep)})")
    return bad


def circles(modules: dict[str, Path]) -> list[str]:
    graph = {m: {d for d in internal_imports(p, modules) if d != m} for m, p in modules.items()}
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}  # a package's __init__
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []
    found: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                found.append("import circle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def optional_dependencies_outside_their_owners(modules: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in modules.items():
        for name in imports(path):
            dep = optional_dependency(name)
            if dep is not None and not owned_by(module, OWNERS[dep]):
                bad.append(f"{module} imports {name}; only {sorted(OWNERS[dep])} may")
    return bad


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names_across_modules(modules: dict[str, Path]) -> list[str]:
    """`from modernlm.x import _y`, or `_y` read off an imported module (`tasks._iter(...)`)."""
    bad = []
    for module, path in modules.items():
        bound = set()  # local names of imported modernlm modules
        for n, _ in import_nodes(path):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("modernlm"):
                bad += [f"{module} imports {n.module}.{a.name}" for a in n.names if private(a.name)]
                names = {a.asname or a.name: f"{n.module}.{a.name}".removeprefix("modernlm.") for a in n.names}
                bound |= {local for local, full in names.items() if full in modules}
            elif isinstance(n, ast.Import):
                bound |= {a.asname for a in n.names if a.asname and a.name.startswith("modernlm.")}
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound and private(
                n.attr
            ):
                bad.append(f"{module}:{n.lineno} reads {n.value.id}.{n.attr}")
    return bad


def package_imports_inside_the_library(modules: dict[str, Path]) -> list[str]:
    """`from modernlm import load` hides an edge to the facade; name the module instead.
    (`from modernlm import kernels` names a module: the edge is in plain sight.)"""
    bad = []
    for module, path in modules.items():
        if module == "__init__":
            continue
        for n, _ in import_nodes(path):
            facade = [a.name for a in n.names if a.name not in modules] if isinstance(n, ast.ImportFrom) else []
            if isinstance(n, ast.ImportFrom) and n.module == "modernlm" and facade:
                bad.append(f"{module}: from modernlm import {', '.join(facade)}")
            if isinstance(n, ast.Import) and any(a.name == "modernlm" for a in n.names):
                bad.append(f"{module}: import modernlm")
    return bad


# Parts of torch a process pays for only where it uses them: imported inside the functions that do.
HEAVY = {"torch._dynamo": "~70 MB resident; `modernlm serve` on a CPU never compiles"}


def needless_lazy_imports(modules: dict[str, Path]) -> list[str]:
    """In a module that imports torch at the top, a function-level import only of an optional
    dependency (one of OWNERS) or of a HEAVY part of torch."""
    bad = []
    for module, path in modules.items():
        if not top_level_torch(path):
            continue
        for n, lazy, guarded in import_statements(path):
            if not lazy or guarded:
                continue
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
            lifted = [x for x in names if optional_dependency(x) is None and x not in HEAVY]
            bad += [f"{module}:{n.lineno} imports {x} inside a function" for x in lifted]
    return bad


RULES = [
    unplaced,
    edges_against_the_graph,
    circles,
    optional_dependencies_outside_their_owners,
    private_names_across_modules,
    package_imports_inside_the_library,
    needless_lazy_imports,
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_the_library_keeps_the_rule(rule):
    bad = rule(MODULES)
    assert not bad, f"{rule.__name__}:\n" + "\n".join(sorted(bad))


def test_model_knows_nothing_of_checkpoints_generation_or_training():
    assert internal_imports(MODULES["model"], MODULES) <= {"errors", "config", "kernels"}


def test_the_kernels_import_nothing_of_ours():
    """The decoding ops sit below the model: torch and the C++ source only."""
    assert internal_imports(MODULES["kernels"], MODULES) == set()


def test_top_level_modules_import_no_torch_at_module_level():
    for name in ("__init__.py", "cli.py", "config.py", "errors.py", "files.py"):
        assert not top_level_torch(PACKAGE / name), name


# ---- the test of the test: a temporary module breaking each rule makes it fail --------------------------

BREAKERS = {
    "edges_against_the_graph": ("data/bad.py", "from modernlm.align.sft import SFTBatches\n"),
    "unplaced": ("newpackage/bad.py", "import json\n"),
    "circles": ("data/bad.py", "from modernlm.data import bad2\n"),  # bad2 imports bad back (below)
    "optional_dependencies_outside_their_owners": ("serve/bad.py", "def f():\n    import transformers\n"),
    "private_names_across_modules": ("serve/bad.py", "from modernlm import data\nfrom modernlm.data import tasks\n"
                                     "from modernlm.tokenizer import _byte_decoder\n\nx = tasks._ITERS\n"),
    "package_imports_inside_the_library": ("eval/bad.py", "from modernlm import load\n"),
    "needless_lazy_imports": ("eval/bad.py", "import torch\n\n\ndef f():\n    from modernlm import model\n"),
}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_a_module_breaking_the_rule_fails_it(rule, tmp_path):
    where, source = BREAKERS[rule.__name__]
    file = tmp_path / where
    file.parent.mkdir(parents=True)
    file.write_text(source)
    modules = dict(MODULES) | {module_name(file, tmp_path): file}
    if rule is circles:
        other = file.with_name("bad2.py")
        other.write_text("from modernlm.data import bad\n")
        modules[module_name(other, tmp_path)] = other
    assert rule(dict(MODULES)) == [], "the library itself must keep the rule for this test to mean anything"
    bad = rule(modules)
    assert bad and all(module_name(file, tmp_path) in line for line in bad), bad


def test_the_graph_has_no_circle_itself():
    """ALLOWED is a DAG apart from a node's own modules: the layering says something."""
    state: dict[str, int] = {}

    def visit(n: str) -> None:
        state[n] = 1
        for d in ALLOWED.get(n, ()):
            if d == n:
                continue
            assert state.get(d) != 1, f"ALLOWED has a circle through {n} -> {d}"
            if d not in state:
                visit(d)
        state[n] = 2

    for n in ALLOWED:
        if n not in state:
            visit(n)


def test_gguf_is_read_by_gguf_weights_alone(tmp_path):
    """gguf (the `hf` extra) is imported inside gguf_weights' and hf/gguf_export's functions; anywhere
    else is an edge."""
    file = tmp_path / "hf" / "bad.py"
    file.parent.mkdir()
    file.write_text("def f():\n    from gguf import GGUFReader\n")
    modules = dict(MODULES) | {module_name(file, tmp_path): file}
    assert any("gguf" in line for line in imports(MODULES["gguf_weights"]))
    bad = optional_dependencies_outside_their_owners(modules)
    assert bad and all(line.startswith("hf.bad imports gguf") for line in bad), bad
