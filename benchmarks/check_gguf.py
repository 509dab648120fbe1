"""`modernlm convert --to gguf` checked in llama.cpp: the same tokens, the same greedy text, the q8_0 cost.

For one model (a modernlm checkpoint or run; an HF directory or .gguf is converted to one first),
this exports f32 and q8_0 files with `modernlm convert SRC F.gguf --to gguf --type T`, serves the
f32 file with llama.cpp's `llama-server --jinja` and an f32 KV cache (built from PyPI's llama-cpp-python sdist by
llama_cpp.py when missing) and prints:

- tokenization: the ids of `/tokenize` against our tokenizer's, line by line, on the first
  `--lines` non-empty lines of WikiText-2 test (and of `--text-file`, e.g. the demo's corpus);
- greedy completion: `--prompts` prompts (the first words of `--prompt-file`'s lines, default
  WikiText-2 test), `--new-tokens` tokens each, `/completion` on the prompt's ids against
  `generation.generate` (of the ids the tokenizer has, as `modernlm generate`), both stopping at
  llama.cpp's end-of-generation tokens: equal token lists;
- greedy chat (a model with a chat template): `/v1/chat/completions` against `LM.chat`, the reply
  texts, on `--prompts` user messages from `--chat-file` (a JSON / JSON-lines list of records with
  an instruction, question or prompt, e.g. the demo's data/sft/val.json), else the same prompts;
  once more with llama-server's default (f16) KV cache, as a user who adds no flags meets it;
- perplexity on the first `--ppl-tokens` tokens of `--ppl-file` (default WikiText-2 test) by
  llama.cpp's method (chunks of `--ctx` tokens, the first token of each made bos when the file adds
  one, the second half of each scored): ours at float32 and with the q8_0 file's weights (`load(..., quantize="auto")`),
  llama-perplexity on the f32 and q8_0 files.

    python benchmarks/check_gguf.py runs/demo/sft --chat-file runs/demo/data/sft/val.json \\
        --text-file runs/demo/data/corpus/val.txt --ppl-file runs/demo/data/corpus/val.txt
    python benchmarks/check_gguf.py SmolLM2.gguf  # its path: modernlm.commands.eval_table.default_baseline()

Results also go to `--json`. tests/test_gguf_llama_cpp.py runs these functions on a tiny model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # llama_cpp: a sibling of this file

import llama_cpp  # noqa: E402

from modernlm import load  # noqa: E402
from modernlm.chat import IM_END  # noqa: E402
from modernlm.checkpoint import is_modernlm_checkpoint  # noqa: E402
from modernlm.files import atomic_write, atomic_write_json  # noqa: E402
from modernlm.generation import generate, prompt_ids  # noqa: E402
from modernlm.hf.gguf_export import add_bos_of  # noqa: E402

try:
    import httpx
except ImportError:  # the venv ships httpx's successor under its own name
    import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
# llama.cpp keeps its KV cache in f16 by default (and its flash attention rounds to f16): float32
# throughout compares like with like (measured on a tiny model: logprobs 4e-6 apart, against 5e-3)
F32_KV = ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]
WIKITEXT = ROOT.parent / "shared/data/wikitext-2/wiki.test.raw"


# ---- files -----------------------------------------------------------------------------------


def run_modernlm(*argv: str) -> None:
    cmd = [sys.executable, "-m", "modernlm", *argv]
    print("$ modernlm " + " ".join(argv), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def checkpoint_of(source: str, work: Path) -> str:
    """A modernlm checkpoint: `source` itself, or its conversion (made once, in `work`)."""
    if is_modernlm_checkpoint(source) or (Path(source) / "checkpoints").is_dir():
        return source
    out = work / "checkpoint"
    if not is_modernlm_checkpoint(out):
        run_modernlm("convert", source, str(out), "overwrite=true")
    return str(out)


def export(checkpoint: str, out: Path, type: str) -> Path:
    """`modernlm convert CHECKPOINT OUT --to gguf --type TYPE`: the one command a user runs."""
    run_modernlm("convert", checkpoint, str(out), "--to", "gguf", "--type", type, "overwrite=true")
    return out


def text_lines(path: Path, n: int) -> list[str]:
    """The first `n` non-empty lines of a text file, without their newline."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
                if len(lines) == n:
                    break
    return lines


def prompts_from(path: Path, n: int, words: int = 12) -> list[str]:
    """The first `words` words of the first `n` lines with at least 2 * `words` of them."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 * words and not line.lstrip().startswith("="):  # not a WikiText heading
                out.append(" ".join(parts[:words]))
                if len(out) == n:
                    break
    return out


def chat_prompts(path: Path, n: int) -> list[str]:
    """User messages from a JSON list or JSON lines of records (instruction / question / prompt)."""
    text = path.read_text(encoding="utf-8")
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    out = []
    for r in records:
        message = next((r[k] for k in ("instruction", "question", "prompt") if r.get(k)), None)
        if message:
            out.append(message + (f"\n\n{r['input']}" if r.get("input") else ""))
        if len(out) == n:
            break
    return out


# ---- the checks ------------------------------------------------------------------------------


def tokenization(url: str, tokenizer, lines: list[str]) -> dict:
    """Lines whose ids from llama.cpp's /tokenize equal ours; the first that differs, if any."""
    equal, first = 0, None
    with httpx.Client(timeout=60) as client:
        for line in lines:
            theirs = client.post(url + "/tokenize", json={"content": line, "add_special": False}).json()["tokens"]
            ours = tokenizer.encode(line)
            equal += theirs == ours
            if theirs != ours and first is None:
                first = {"line": line[:200], "ours": ours[:40], "llama.cpp": theirs[:40]}
    return {"equal": equal, "total": len(lines), "tokens": sum(len(tokenizer.encode(x)) for x in lines), "first": first}


def eog_ids(tokenizer) -> list[int]:
    """The tokens llama.cpp ends a generation at for our files: eos, <|im_end|>, <|endoftext|>."""
    ids = [tokenizer.eos_id, tokenizer.token_to_id(IM_END), tokenizer.token_to_id("<|endoftext|>")]
    return sorted({i for i in ids if i is not None})


def until_eog(ids: list[int], eog: list[int]) -> list[int]:
    cut = next((k for k, t in enumerate(ids) if t in eog), len(ids))
    return ids[:cut]


@torch.no_grad()
def greedy(url: str, lm, prompts: list[str], n: int) -> dict:
    """Greedy continuations of each prompt's ids (bos by our rule): llama.cpp's against ours."""
    eog, equal, rows = eog_ids(lm.tokenizer), 0, []
    with httpx.Client(timeout=600) as client:
        for prompt in prompts:
            ids = prompt_ids(lm.tokenizer, prompt)
            body = {"prompt": ids, "n_predict": n, "temperature": 0.0, "return_tokens": True, "cache_prompt": False}
            theirs = until_eog(client.post(url + "/completion", json=body).json()["tokens"], eog)
            out = generate(lm.model, torch.tensor([ids]), n, eos_token_id=eog, vocab_size=lm.tokenizer.vocab_size)
            ours = until_eog(out[0, len(ids) :].tolist(), eog)
            equal += theirs == ours
            pairs = zip(ours, theirs, strict=False)
            common = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(theirs)))
            rows.append({"prompt": prompt, "ours": len(ours), "llama.cpp": len(theirs), "common": common})
    return {"equal": equal, "total": len(prompts), "rows": rows}


def chats(url: str, model_id: str, lm, messages: list[str], n: int) -> dict:
    """Greedy chat replies: llama-server's /v1/chat/completions (its --jinja template) against LM.chat."""
    equal, rows = 0, []
    with httpx.Client(timeout=600) as client:
        for text in messages:
            conversation = [{"role": "user", "content": text}]
            body = {"model": model_id, "messages": conversation, "max_tokens": n, "temperature": 0.0}
            theirs = client.post(url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            ours = lm.chat(conversation, max_new_tokens=n)
            # a reply cut by max_tokens inside a character ends in U+FFFD: one per byte in ours, one in
            # llama.cpp's; the rest is compared exactly
            equal += theirs.rstrip("\ufffd") == ours.rstrip("\ufffd")
            rows.append({"message": text[:120], "ours": ours, "llama.cpp": theirs})
    return {"equal": equal, "total": len(messages), "rows": rows}


@torch.no_grad()
def our_perplexity(lm, ids: list[int], ctx: int, bos: int | None) -> float:
    """llama-perplexity's number from our model: chunks of `ctx` tokens, the first made bos (when
    the file adds one), the second half of each chunk scored, over the tokenizer's ids (the file's
    vocabulary; the padded rows of our head hold a little probability: 0.1% of the demo's)."""
    first, nll, count = ctx // 2, 0.0, 0
    for i in range(len(ids) // ctx):
        chunk = torch.tensor(ids[i * ctx : (i + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        logits = lm.logits_fn(chunk[None])[0, first : ctx - 1, : lm.tokenizer.vocab_size].float()
        nll -= torch.log_softmax(logits, -1).gather(1, chunk[first + 1 :, None]).sum().item()
        count += ctx - 1 - first
    return math.exp(nll / count)


def llama_perplexity(model: Path, text_file: Path, ctx: int, chunks: int) -> float:
    """llama-perplexity's estimate (f32 KV cache, as the server's); it must score `chunks` chunks,
    as ours does (else the two tokenized the file differently)."""
    cmd = [str(llama_cpp.tool("llama-perplexity")), "-m", str(model), "-f", str(text_file), "-c", str(ctx),
           "-b", str(ctx), "-t", str(os.cpu_count() or 1), *F32_KV]  # fmt: skip
    print("$ " + " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    m, n = re.search(r"Final estimate: PPL = ([0-9.]+)", log), re.search(r"over (\d+) chunks", log)
    if m is None or n is None:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{log[-2000:]}")
    if int(n[1]) != chunks:
        raise RuntimeError(f"llama-perplexity scored {n[1]} chunks of {text_file}, ours {chunks}")
    return float(m[1])


def ppl_text(tokenizer, path: Path, n_tokens: int, out: Path) -> tuple[Path, list[int]]:
    """The shortest prefix of whole lines of `path` holding `n_tokens` tokens, written to `out`."""
    text, lines = "", path.read_text(encoding="utf-8").splitlines(keepends=True)
    for k in range(0, len(lines), 50):
        text = "".join(lines[: k + 50])
        if len(tokenizer.encode(text)) >= n_tokens:
            break
    atomic_write(out, text)
    return out, tokenizer.encode(text, add_bos=add_bos_of(tokenizer))


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="a modernlm checkpoint or run; an HF directory or .gguf is converted first")
    p.add_argument("--lines", type=int, default=2000, help="lines of each text tokenized by both")
    p.add_argument("--text-file", action="append", default=[], help="more text to tokenize (e.g. the demo's corpus)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-file", default=str(WIKITEXT), help="completion prompts: first words of its lines")
    p.add_argument("--chat-file", default="", help="user messages: JSON records with instruction / question / prompt")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--ppl-tokens", type=int, default=40000, help="0: no perplexity")
    p.add_argument("--ppl-file", default=str(WIKITEXT), help="the perplexity text (e.g. the demo's held-out corpus)")
    p.add_argument("--ctx", type=int, default=512, help="perplexity chunk (at most the model's context)")
    p.add_argument("--work", default="", help="where the files go (default: a cache folder per model)")
    p.add_argument("--json", default="", help="write the results here too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    key = hashlib.sha1(str(Path(args.model).resolve()).encode()).hexdigest()[:10]
    work = Path(args.work or Path.home() / ".cache/modernlm/check_gguf" / f"{Path(args.model).name}-{key}")
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_of(args.model, work)
    files = {t: export(checkpoint, work / f"model-{t}.gguf", t) for t in ("f32", "q8_0")}
    lm = load(checkpoint)
    tok = lm.tokenizer
    texts = {"WikiText-2 test": text_lines(WIKITEXT, args.lines)}
    texts |= {Path(f).name: text_lines(Path(f), args.lines) for f in args.text_file}
    prompts = prompts_from(Path(args.prompt_file), args.prompts)
    messages = chat_prompts(Path(args.chat_file), args.prompts) if args.chat_file else prompts
    ctx = min(args.ctx, lm.model.config.max_seq_len)
    res: dict = {"model": args.model, "files": {t: str(f) for t, f in files.items()}, "new_tokens": args.new_tokens}

    serve_args = ["-t", str(os.cpu_count() or 1), "-np", "1", "-c", str(lm.model.config.max_seq_len), "--jinja"]
    with llama_cpp.serving(files["f32"], serve_args + F32_KV) as (_, url, model_id):
        res["tokenization"] = {name: tokenization(url, tok, lines) for name, lines in texts.items()}
        res["greedy"] = greedy(url, lm, prompts, args.new_tokens)
        if lm.has_chat_template:
            res["chat"] = chats(url, model_id, lm, messages, args.new_tokens)
    if lm.has_chat_template:  # what a user gets from `llama-server -m F --jinja` as it comes
        with llama_cpp.serving(files["f32"], serve_args) as (_, url, model_id):
            res["chat f16 KV"] = chats(url, model_id, lm, messages, args.new_tokens)
    if args.ppl_tokens:
        text_file, ids = ppl_text(tok, Path(args.ppl_file), args.ppl_tokens, work / "ppl.txt")
        bos = tok.bos_id if add_bos_of(tok) else None
        q8 = load(files["q8_0"], quantize="auto")
        res["perplexity"] = {
            "text": Path(args.ppl_file).name, "tokens": len(ids), "ctx": ctx,
            "ours f32": our_perplexity(lm, ids, ctx, bos), "ours q8_0": our_perplexity(q8, ids, ctx, bos),
            "llama.cpp f32": llama_perplexity(files["f32"], text_file, ctx, len(ids) // ctx),
            "llama.cpp q8_0": llama_perplexity(files["q8_0"], text_file, ctx, len(ids) // ctx),
        }  # fmt: skip
    report(res)
    if args.json:
        atomic_write_json(args.json, res)
    return res


def report(res: dict) -> None:
    print(f"\n{res['model']}: exported with `modernlm convert --to gguf`, checked in llama.cpp ({llama_cpp.VERSION})\n")
    print("| check | agreement |\n|---|---|")
    for name, r in res["tokenization"].items():
        print(f"| tokenization, {name} ({r['tokens']:,} tokens) | {r['equal']}/{r['total']} lines equal |")
    g = res["greedy"]
    print(f"| greedy completion, f32, {res['new_tokens']} tokens | {g['equal']}/{g['total']} equal token for token |")
    if "chat" in res:
        c = res["chat"]
        print(f"| greedy chat, f32 (llama-server --jinja vs LM.chat) | {c['equal']}/{c['total']} equal replies |")
        c = res["chat f16 KV"]
        print(f"| the same, llama.cpp's default f16 KV cache | {c['equal']}/{c['total']} equal replies |")
    if "perplexity" in res:
        p = res["perplexity"]
        print(f"\nPerplexity on {p['text']}, {p['tokens']:,} tokens, llama-perplexity's chunks of {p['ctx']}:\n")
        print("| weights | ours | llama.cpp |\n|---|---:|---:|")
        for t in ("f32", "q8_0"):
            print(f"| {t} | {p[f'ours {t}']:.4f} | {p[f'llama.cpp {t}']:.4f} |")
        d_ours, d_llama = p["ours q8_0"] / p["ours f32"] - 1, p["llama.cpp q8_0"] / p["llama.cpp f32"] - 1
        print(f"| q8_0 vs f32 | {d_ours:+.2%} | {d_llama:+.2%} |")
    for r in res["tokenization"].values():
        if r["first"]:
            print(f"first differing line: {r['first']}")


if __name__ == "__main__":
    main()
