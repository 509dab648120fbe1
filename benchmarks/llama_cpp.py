"""Find or build llama.cpp's tools (llama-server, llama-perplexity, llama-quantize) for benchmarks.

The sources are the llama.cpp tree vendored in PyPI's llama-cpp-python sdist (a pinned version,
so every run of a benchmark compares against the same llama.cpp), fetched with pip and built with
cmake under the cache directory, outside the repo: `$MODERNLM_LLAMA_CPP`, else
~/.cache/modernlm/llama-cpp/. A tool already built there is used as it is; a missing one is
built (minutes on a laptop: cmake and a C++ compiler are needed). The same tree's
convert_hf_to_gguf.py turns an HF directory into a .gguf.

    python benchmarks/llama_cpp.py          # builds what is missing, prints the tools' paths
    python benchmarks/llama_cpp.py convert HF_DIR --outtype q8_0 --outfile F.gguf

`serving(model, args)` runs a llama-server on 127.0.0.1 for a `with` block (bench_decode_peers.py,
check_gguf.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve: a sibling of this file

from bench_serve import free_port, stop_server  # noqa: E402

from modernlm.errors import UserError  # noqa: E402

try:
    import httpx
except ImportError:  # the venv ships httpx's successor under its own name
    import httpx2 as httpx

VERSION = "0.3.36"  # llama-cpp-python's; its vendor/llama.cpp is the llama.cpp measured
TOOLS = ("llama-server", "llama-perplexity", "llama-quantize")
CONFIGURE = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",  # this CPU's vector units
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("MODERNLM_LLAMA_CPP") or Path.home() / ".cache/modernlm/llama-cpp").expanduser()


def source_dir() -> Path:
    """The llama.cpp tree (downloaded and unpacked on first use)."""
    root = cache_dir()
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={VERSION}", "-d", str(root)]  # fmt: skip
        run(cmd, "downloading llama-cpp-python's sdist (it holds llama.cpp's sources)")
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")  # "data": no links or paths out of root
    if not (src / "CMakeLists.txt").is_file():
        raise UserError(f"{sdist} holds no vendor/llama.cpp/CMakeLists.txt (remove it to download it again)")
    return src


def tool(name: str) -> Path:
    """The path of a built tool of TOOLS, building the missing ones first."""
    path = source_dir() / "build" / "bin" / name
    if not path.is_file():
        build(source_dir())
    return path


def convert_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (it imports the `gguf` package: run it with a Python that has it)."""
    return source_dir() / "convert_hf_to_gguf.py"


def convert_command(hf_dir: Path, outtype: str, outfile: Path) -> list[str]:
    """The command that writes hf_dir as a .gguf of outtype (f32, q8_0, ...), run by this Python."""
    return [sys.executable, __file__, "convert", str(hf_dir), "--outtype", outtype, "--outfile", str(outfile)]


def convert(argv: list[str]) -> None:
    """convert_hf_to_gguf.py ARGV, run as `python convert_hf_to_gguf.py ARGV` runs it. Its tokenizer
    step imports sentencepiece before it looks for a tokenizer.model, and only that file's absence
    sends it on to tokenizer.json (BPE: SmolLM2's kind); without the package, the file is looked for
    first, so a directory without one converts and a directory with one still fails on the import."""
    script = convert_script()
    sys.path.insert(0, str(script.parent))  # its conversion/ package, as for `python script.py`
    if "NO_LOCAL_GGUF" not in os.environ:  # the script's own rule: its gguf-py, not the installed gguf
        sys.path.insert(1, str(script.parent / "gguf-py"))
    if importlib.util.find_spec("sentencepiece") is None:
        from conversion.base import TextModel

        sentencepiece_vocab = TextModel._create_vocab_sentencepiece

        def create_vocab(self):
            if not (self.dir_model / "tokenizer.model").is_file():
                raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
            return sentencepiece_vocab(self)

        TextModel._create_vocab_sentencepiece = create_vocab
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def build(src: Path) -> None:
    """cmake configure (once) and build of TOOLS in src/build, one build at a time (a lock file)."""
    if shutil.which("cmake") is None:
        raise UserError("building llama.cpp needs cmake and a C++ compiler (apt install cmake g++)")
    with open(cache_dir() / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run building: wait for it, then find its tools
        if all((src / "build" / "bin" / t).is_file() for t in TOOLS):
            return
        if not (src / "build" / "CMakeCache.txt").is_file():
            run(["cmake", "-B", "build", *CONFIGURE], "configuring llama.cpp", cwd=src)
        jobs = str(os.cpu_count() or 1)
        run(["cmake", "--build", "build", "--config", "Release", "-j", jobs, "--target", *TOOLS],
            f"building {', '.join(TOOLS)} (minutes)", cwd=src)  # fmt: skip


NO_REPACK: set[str] = set()  # the models `serving` started again with --no-repack (for a report to say)


@contextlib.contextmanager
def serving(model: Path, args: list[str]) -> Iterator[tuple[int, str, str]]:
    """A live `llama-server -m model --host 127.0.0.1 --port P *args`: (its pid, base URL, model
    id); on an error its log's tail goes to stderr. A server killed by SIGILL or SIGSEGV while it
    loads is started once more with --no-repack: llama.cpp repacks Q8_0 weights for AMX wherever
    the CPU lists AMX, and where the OS or the hypervisor does not enable it (a VM of this
    project's) the repacking faults; --no-repack keeps the weights as the file has them."""
    port = free_port()
    cmd = [str(tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    with tempfile.TemporaryFile() as log:
        proc = None
        try:
            proc, url = _start(cmd, log)
            if proc.poll() in (-signal.SIGILL, -signal.SIGSEGV) and "--no-repack" not in args:
                NO_REPACK.add(str(model))
                print(f"llama-server: killed by signal {-proc.returncode} while loading (the AMX repacking this "
                      "CPU does not allow): again with --no-repack", file=sys.stderr)  # fmt: skip
                cmd.append("--no-repack")
                proc, url = _start(cmd, log)
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server did not become healthy (exit code {proc.returncode})")
            model_id = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            yield proc.pid, url, model_id
        except BaseException:
            log.seek(0)
            print(log.read().decode(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            if proc is not None:
                stop_server(proc)


def _start(cmd: list[str], log: Any) -> tuple[subprocess.Popen, str]:
    """`cmd` started, when its /health says 200 or it has exited (the caller looks at which)."""
    print("$ " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}", time.monotonic() + 300
    while proc.poll() is None:  # /health: 503 while the model loads, 200 when ready
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError("llama-server did not become healthy in 300 s")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        time.sleep(0.5)
    return proc, url


def run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    print(f"{what}: $ {' '.join(cmd)}", file=sys.stderr)
    if subprocess.run(cmd, cwd=cwd).returncode != 0:
        raise UserError(f"{what} failed (the command above; its output is above)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["convert"]:  # convert_command's: convert_hf_to_gguf.py's arguments follow
        convert(sys.argv[2:])
        sys.exit()
    try:
        for t in TOOLS:
            print(tool(t))
        print(convert_script())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
