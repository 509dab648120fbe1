"""`python -m modernlm.eval.tasks ARGS`: lm-eval's own command line with the model "modernlm" registered,
for lm-eval releases that do not yet discover installed models by entry point:

    python -m modernlm.eval.tasks run --model modernlm --model_args pretrained=runs/sft --tasks sst2

User mistakes are one line on stderr and exit code 2, no traceback, before any long work: for
`--model modernlm`, `--model_args` (pretrained= given and a model source, known keys, valid values)
is checked before lm-eval starts (it indexes every harness task first, then loads the model); an
unknown task is reported as soon as lm-eval has looked for it, before the model loads; whatever
`UserError` comes later (e.g. from loading the model) is one line too.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from modernlm.errors import UserError

PROG = "modernlm.eval.tasks"
MODEL_ARGS = ("pretrained", "max_length", "max_gen_toks", "dtype", "backend")  # ModernLMEval's own
LM_EVAL_OPTIONS = ("batch_size", "device")  # lm-eval passes these itself: in model_args they clash


def option_values(argv: list[str], names: tuple[str, ...]) -> list[list[str]]:
    """The values of every occurrence of an option in argv: `--x a b` (up to the next option) or `--x=a`."""
    found, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        i += 1
        if name not in names:
            continue
        if eq:
            found.append([value])
            continue
        start = i
        while i < len(argv) and not argv[i].startswith("-"):
            i += 1
        found.append(argv[start:i])
    return found


def parse_model_args(tokens: list[str]) -> dict[str, Any]:
    """lm-eval's `--model_args` syntax: a JSON object, or `key=value` items (comma- or space-separated)."""
    if tokens and tokens[0].lstrip().startswith("{"):
        try:
            value = json.loads(tokens[0])
        except json.JSONDecodeError as e:
            raise UserError(f"--model_args: not a JSON object ({e})") from None
        if isinstance(value, dict):
            return value
    args: dict[str, Any] = {}
    for token in tokens:
        for item in token.split(","):
            key, eq, value = item.partition("=")
            if not eq and item.strip():
                raise UserError(f"--model_args: expected key=value, got {item.strip()!r}")
            if eq:
                args[key.strip()] = value.strip()
    return args


def read_config(argv: list[str]) -> dict[str, Any]:
    """lm-eval's `--config` YAML (its model and model_args; the command line overrides them)."""
    paths = option_values(argv, ("--config", "-C"))
    if not paths or not paths[-1]:
        return {}
    from pathlib import Path

    import yaml

    path = Path(paths[-1][0])
    if not path.is_file():
        raise UserError(f"--config: {path}: no such file")
    config = yaml.safe_load(path.read_text())
    return config if isinstance(config, dict) else {}


def check_command_line(argv: list[str]) -> None:
    """A UserError naming the first mistake in `--model modernlm`'s arguments (see the module
    docstring); other models' arguments are lm-eval's to check."""
    config = read_config(argv)
    models = option_values(argv, ("--model", "-M", "-m"))
    model = models[-1][0] if models and models[-1] else config.get("model")
    if model != "modernlm":
        return
    given = config.get("model_args") or {}
    args = dict(given) if isinstance(given, dict) else parse_model_args([str(given)])
    for tokens in option_values(argv, ("--model_args", "-a")):
        args.update(parse_model_args(tokens))
    for key in args:
        if key in LM_EVAL_OPTIONS:
            raise UserError(f"--model_args: {key} is lm-eval's own option: give it as --{key}")
        if key not in MODEL_ARGS:
            import difflib

            close = difflib.get_close_matches(key, MODEL_ARGS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(MODEL_ARGS)}"
            raise UserError(f"--model_args: unknown key {key!r} for the modernlm model ({hint})")
    if not args.get("pretrained"):
        raise UserError(
            "--model_args: pretrained=MODEL is required (a modernlm checkpoint or run directory, "
            "an HF directory, hub id or .gguf)"
        )
    from modernlm.api import BACKENDS
    from modernlm.checkpoint import resolve_source
    from modernlm.runtime import DTYPES

    for key, allowed in (("dtype", tuple(DTYPES)), ("backend", BACKENDS)):
        if key in args and args[key] not in allowed:
            raise UserError(f"--model_args: {key} must be one of {', '.join(allowed)}, got {args[key]!r}")
    for key in ("max_length", "max_gen_toks"):
        if key in args and not (str(args[key]).isdigit() and int(args[key]) > 0):
            raise UserError(f"--model_args: {key} must be a positive integer, got {args[key]!r}")
    resolve_source(str(args["pretrained"]), "--model_args pretrained")


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line on argv (default: sys.argv[1:]); 2 on a user mistake."""
    argv = sys.argv[1:] if argv is None else list(argv)
    saved = sys.argv
    try:
        check_command_line(argv)
        from lm_eval.__main__ import cli_evaluate

        import modernlm.eval.tasks.lm  # noqa: F401  (registers "modernlm")

        sys.argv = [saved[0] if saved else PROG, *argv]  # lm-eval reads sys.argv
        try:
            cli_evaluate()
        except ValueError as e:  # lm-eval's one check of the task names, before any model loads
            if not str(e).startswith("Tasks not found"):
                raise
            names = str(e).removeprefix("Tasks not found:").split(". ")[0].strip()
            raise UserError(
                f"--tasks: no such harness task: {names} (`python -m {PROG} ls tasks` lists them; "
                "--include_path adds a folder of task YAMLs)"
            ) from None
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
