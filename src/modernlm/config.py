"""Config loading: typed dataclasses filled from defaults < YAML/JSON file < dotted overrides.

Each module owns the dataclass for its own section (`ModelConfig` in model.py, ...); a command's
`Config` composes the sections it needs. This module only knows how to fill any such dataclass:

    cfg = load_config(Config, "configs/pretrain/tiny.yaml", ["optim.lr=3e-4", "model.n_layer=2"])

Values are coerced by the field's annotation, never guessed: PyYAML reads `3e-4` as the *string*
'3e-4', so a `float` field accepts numeric strings; `bool` accepts only true/false. Unknown keys are
errors naming the dotted path with a "did you mean" suggestion. Every error is a `UserError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from modernlm.errors import UserError

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# The shipped recipes are package data, modernlm/recipes/<group>/<name>.yaml (`configs/` in a checkout
# links there), so `-c NAME` works wherever modernlm is installed. Each command's group:
RECIPE_GROUPS: dict[str, str] = {
    "pretrain": "pretrain",
    "sft": "align",
    "dpo": "align",
    "verifier": "align",
    "grpo": "align",
    "finetune": "finetune",
    "prompt": "prompt",
    "experiment sinks": "experiment",
    "pipeline": "pipeline",
}


def _recipes() -> Any:  # an importlib.resources Traversable: a directory, in a wheel or a checkout
    from importlib.resources import files

    return files("modernlm") / "recipes"


def recipe_names(command: str, group: str | None = None) -> list[str]:
    """The recipe names `modernlm <command> -c NAME` accepts (empty for a command without recipes)."""
    group = group or RECIPE_GROUPS.get(command)
    folder = _recipes() / group if group and not group.startswith(".") else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))


def find_recipe(spec: str | Path, command: str | None = None) -> Any:
    """`tiny` (for `command`'s group) or `pretrain/tiny` -> the shipped recipe file, else None."""
    spec = str(spec)
    if "\\" in spec or spec.count("/") > 1 or Path(spec).suffix:
        return None
    group, _, name = spec.rpartition("/")
    group = group or RECIPE_GROUPS.get(command or "", "")
    if not group or not name or group.startswith("."):
        return None
    recipe = _recipes() / group / f"{name}.yaml"
    return recipe if recipe.is_file() else None


def _not_found(spec: str | Path, command: str | None) -> str:
    text = str(spec)
    group, _, name = text.rpartition("/")
    names = [] if "\\" in text or group.count("/") or Path(text).suffix else recipe_names(command or "", group)
    if not names:
        return f"config file not found: {spec}"
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    owner = f"one of the {group} recipes" if group else f"a recipe of modernlm {command}"
    return f"config {text!r} is neither a file nor {owner}; {hint}recipes: {', '.join(names)}"


def read_config_file(path: str | Path, command: str | None = None) -> dict[str, Any]:
    """Read a .yaml/.yml/.json config file into a dict. A `path` that is not a file may name a shipped
    recipe: `tiny` for `command` "pretrain" (see RECIPE_GROUPS), or `pretrain/tiny` for any command."""
    file = Path(path)
    if file.is_file():
        if file.suffix not in (".yaml", ".yml", ".json"):
            raise UserError(f"config file {path}: expected a .yaml, .yml or .json file")
        try:
            text, suffix = file.read_text(encoding="utf-8"), file.suffix
        except UnicodeDecodeError:
            raise UserError(f"config file {path}: not UTF-8 text") from None
    else:
        recipe = find_recipe(path, command)
        if recipe is None:
            raise UserError(_not_found(path, command))
        text, suffix = recipe.read_text(encoding="utf-8"), ".yaml"
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise UserError(f"config file {path}: cannot parse: {_one_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping at the top level")
    return data


def _one_line(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)  # PyYAML errors carry the position separately
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', e)}"
    return " ".join(str(e).split())


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=3e-4` -> ("optim.lr", "3e-4"). The value stays a string or YAML scalar/list."""
    item = item.removeprefix("--")
    if "=" not in item:
        raise UserError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
    key, value = item.split("=", 1)
    if not key:
        raise UserError(f"override {item!r}: empty key")
    if value.startswith(("[", "{")):  # lists and mappings use YAML flow syntax: a=[1,2]
        import yaml

        try:
            return key, yaml.safe_load(value)
        except Exception:
            raise UserError(f"override {item!r}: cannot parse value {value!r}") from None
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        node = data.get(part)
        if not isinstance(node, dict):
            node = data[part] = {}
        data = node
    data[parts[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str | tuple[str, Any]] = (),
    base: dict[str, Any] | None = None,
    command: str | None = None,
) -> T:
    """Defaults of `cls` < `base` dict < file at `path` (or `command`'s recipe so named) < dotted `overrides`
    ("key=value" strings, or (key, value) pairs taken as they are)."""
    data: dict[str, Any] = dict(base or {})
    if path:
        data = merge(data, read_config_file(path, command))
    for item in overrides:
        key, value = item if isinstance(item, tuple) else parse_override(item)
        set_dotted(data, key, value)
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, recursively, coercing each value by its annotation."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            msg = f"unknown key '{prefix}{key}'"
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            if close:
                msg += f"; did you mean '{prefix}{close[0]}'?"
            else:
                msg += f"; valid keys: {', '.join(fields)}"
            raise UserError(msg)
    data = dict(data)
    for name, f in fields.items():
        if isinstance(data.get(name), dict) and f.default_factory is not dataclasses.MISSING:
            # A section given in part keeps the command's own defaults for it (e.g. SFT's lower lr),
            # not just its class's: the fields where the two differ are merged under the given ones.
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                plain = to_dict(type(default)())
                changed = {k: v for k, v in to_dict(default).items() if plain.get(k) != v}
                data[name] = merge(changed, data[name])
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (ValueError, TypeError, AssertionError) as e:
        raise UserError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=name + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise UserError(f"{name}: expected one of {list(choices)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):  # a=1,2,3 from the command line
            value = [v for v in value.split(",") if v != ""] if value else []
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise UserError(f"{name}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=False)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise UserError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise UserError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                pass
        if number is None:
            raise UserError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan passes every `x > 0` check written as `x <= 0` -> error
            raise UserError(f"{name}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples become lists) so it round-trips through YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (YAML or JSON by suffix), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from modernlm.files import atomic_write

    text = json.dumps(to_dict(cfg), indent=2) if path.suffix == ".json" else to_yaml(cfg)
    atomic_write(path, text)


__all__ = [
    "RECIPE_GROUPS",
    "find_recipe",
    "from_dict",
    "load_config",
    "merge",
    "parse_override",
    "read_config_file",
    "recipe_names",
    "save_config",
    "set_dotted",
    "to_dict",
    "to_yaml",
]
