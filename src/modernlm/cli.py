"""The `modernlm` command: a table of subcommands, each a module with `Config` and `main(cfg)`.

    modernlm <command> [POSITIONAL ...] [-c config.yaml] [key=value ...] [--print-config]

Modules are imported only when their command runs, so `modernlm --help` never imports torch.
A command module may declare `POSITIONALS = ["src", "dst"]` (config fields filled, in order, by
bare arguments; a last name ending in "..." is a list field that takes all the remaining ones)
and `FLAGS = {"--to": "to"}` (flags that take a value; one whose field is a bool is a switch that
takes none: `--force` sets force=true). Anything containing `=` is a dotted override. A
`UserError` becomes one line on stderr and exit code 2. `OUTPUTS = {"out": "file", "run.out_dir":
"dir"}` declares the paths a command writes, and `derived_outputs(cfg)` the (setting, path, kind)
built from other fields: all are checked (`modernlm.files.check_outputs`) before `main(cfg)` runs,
so a path that cannot be written fails in one line before any model is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import textwrap
import typing

# name -> (module, one-line summary). Two-word names are command groups (`modernlm tokenizer train`).
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("modernlm.commands.convert", "convert an HF Llama model or .gguf to modernlm (or back)"),
    "generate": ("modernlm.commands.generate", "generate from checkpoints: one streamed, or several side by side"),
    "chat": ("modernlm.commands.chat", "chat in the terminal with any model source (its chat template, streamed)"),
    "serve": ("modernlm.commands.serve", "OpenAI-compatible server with continuous batching, and a chat page"),
    "tokenizer train": ("modernlm.commands.tokenizer_train", "train a byte-level BPE tokenizer"),
    "prepare": ("modernlm.commands.prepare", "tokenize a corpus into token shards on disk"),
    "pretrain": ("modernlm.commands.pretrain", "pretrain a ModernDecoderLM from token shards"),
    "eval perplexity": ("modernlm.commands.eval_perplexity", "perplexity, bits/byte, word perplexity of a model"),
    "eval tasks": (
        "modernlm.commands.eval_tasks", "lm-evaluation-harness tasks (offline SST-2, GSM8K, WikiText, or any)"),
    "eval table": ("modernlm.commands.eval_table", "WikiText-2 perplexity of baselines next to our checkpoints"),
    "eval checkpoints": ("modernlm.commands.eval_checkpoints", "score every checkpoint of a run into a CSV"),
    "plot": ("modernlm.commands.plot", "loss and perplexity curves of one or more runs (PNG)"),
    "experiment sinks": ("modernlm.commands.experiment_sinks", "attention sinks vs none past the trained context"),
    "finetune": ("modernlm.commands.finetune", "LoRA finetuning of HF models (PEFT) and modernlm checkpoints on tasks"),
    "prompt": ("modernlm.commands.prompt", "zero- and few-shot prompting baselines on SST-2, SAMSum, GSM8K"),
    "report": ("modernlm.commands.report", "Markdown + HTML report of a pipeline or run directories"),
    "sft": ("modernlm.commands.sft", "supervised finetuning of a checkpoint on chats (ChatML, loss on replies)"),
    "dpo": ("modernlm.commands.dpo", "direct preference optimisation against a frozen reference"),
    "verifier": ("modernlm.commands.verifier", "GSM8K verifier: sample, label, train a value head, rerank best-of-N"),
    "grpo": ("modernlm.commands.grpo", "GRPO: reinforcement learning with verifiable rewards (answer checker)"),
    "pipeline": ("modernlm.commands.pipeline", "every stage end to end from one recipe, then the report"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: modernlm <command> [args] [-c CONFIG] [key=value ...] [--print-config]\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "`modernlm <command> --help` shows a command's options and defaults."
    )


def _find_command(argv: list[str]) -> tuple[str, list[str]] | None:
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(version("modernlm"))
        return
    found = _find_command(argv)
    if found is None:
        import difflib

        words = " ".join(argv[:2])
        close = difflib.get_close_matches(argv[0], {n.split()[0] for n in COMMANDS}, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"modernlm: unknown command '{words}'{hint}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    name, rest = found
    sys.exit(run_command(name, rest))


def run_command(name: str, argv: list[str]) -> int:
    """Parse `argv` for command `name`, run it, and return the exit code."""
    from modernlm.config import load_config, recipe_names, to_yaml
    from modernlm.errors import Interrupted, UserError

    module = importlib.import_module(COMMANDS[name][0])
    positionals: list[str] = getattr(module, "POSITIONALS", [])
    flags: dict[str, str] = getattr(module, "FLAGS", {})

    parser = argparse.ArgumentParser(
        prog=f"modernlm {name}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(module.__doc__ or "").strip(),
        epilog="defaults (override with key=value):\n" + textwrap.indent(to_yaml(module.Config()), "  "),
    )
    recipes = ", ".join(recipe_names(name))  # `-c NAME`: a recipe shipped in the package
    config_help = f"YAML or JSON config file, or a recipe: {recipes}" if recipes else "YAML or JSON config file"
    parser.add_argument("-c", "--config", help=config_help)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    defaults = module.Config()
    for flag, field in flags.items():
        if isinstance(getattr(defaults, field, None), bool):  # a switch: `--force` means force=true
            parser.add_argument(flag, dest=f"flag_{field}", action="store_const", const="true")
        else:
            parser.add_argument(flag, dest=f"flag_{field}", metavar=field.upper())
    names = [p.removesuffix("...") for p in positionals]
    rest = positionals[-1].endswith("...") if positionals else False
    parser.add_argument("args", nargs="*", help=" ".join(p.upper() for p in positionals) + " key=value ...")
    ns = parser.parse_intermixed_args(argv)  # flags may come after positionals

    overrides = [a for a in ns.args if "=" in a]
    bare = [a for a in ns.args if "=" not in a]
    if len(bare) > len(names) and not rest:
        parser.print_usage(sys.stderr)
        print(f"modernlm {name}: error: unexpected argument {bare[len(names)]!r}", file=sys.stderr)
        return 2
    # Positionals and flags come first so that an explicit key=value still wins. A string field's
    # value is taken as it is written: `--system "[Be brief] and polite"` is text, not a YAML list.
    text = {k for k, tp in typing.get_type_hints(module.Config).items() if tp is str}
    pre: list[str | tuple[str, str]] = [
        (field, value) if field in text else f"{field}={value}"
        for field, value in zip(names[: len(names) - rest], bare, strict=False)
    ]
    if rest and bare[len(names) - 1 :]:
        pre.append(f"{names[-1]}={json.dumps(bare[len(names) - 1 :])}")  # a YAML flow list
    flag_values = {field: getattr(ns, f"flag_{field}") for field in flags.values()}
    pre += [
        (field, value) if field in text else f"{field}={value}"
        for field, value in flag_values.items()
        if value is not None
    ]
    try:
        cfg = load_config(module.Config, ns.config, pre + overrides, command=name)
        if ns.print_config:
            print(to_yaml(cfg), end="")
            return 0
        _check_outputs(module, cfg, flags, flag_values, overrides)
        module.main(cfg)
    except UserError as e:
        _say(f"modernlm {name}: error: {e}")
        return 2
    except Interrupted as e:  # training stopped by SIGINT / SIGTERM after saving a checkpoint
        _say(f"modernlm {name}: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _say(f"modernlm {name}: interrupted")
        return 130
    return 0


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun every rank may say it at the same moment, and
    print's two writes (text, then newline) on an unbuffered stderr would interleave the ranks' lines."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _check_outputs(module, cfg, flags: dict[str, str], flag_values: dict, overrides: list[str]) -> None:
    """The module's OUTPUTS (dotted field -> "file" | "dir") and derived_outputs(cfg), checked
    before any work: a path that cannot be written is a UserError naming the setting as written."""
    from modernlm.files import check_outputs

    outputs: dict[str, str] = getattr(module, "OUTPUTS", {})
    derived = getattr(module, "derived_outputs", None)
    if not outputs and derived is None:
        return
    # A flag names its field, unless an explicit key=value replaced the flag's value.
    names = {
        field: flag
        for flag, field in flags.items()
        if flag_values.get(field) is not None and not any(o.startswith(f"{field}=") for o in overrides)
    }
    check_outputs(cfg, outputs, derived(cfg) if derived else (), names)
