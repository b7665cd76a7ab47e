"""llama.cpp's own tools, one pinned version for everything GGUF: its converters (convert_hf_to_gguf.py,
convert_lora_to_gguf.py, with their gguf-py), its quantizer (llama-quantize) and its runner (llama-completion).

All come from the `llama-cpp-python` source distribution on PyPI (MIT), which carries llama.cpp's whole source in
vendor/llama.cpp: pip fetches it where PyPI can be reached (here, Colab, CI), and a copy of its trimmed source
(LORA_KIT_LLAMA_CPP_SOURCE) stands in where nothing can be (the offline GPU machine). The two binaries are built
with cmake once, portable (no -march=native: the same binaries run on any x86-64 CPU with AVX2), in a temporary
folder renamed into the cache only when complete. The cache lies outside the clone, keyed by version
(~/.cache/lora-kit/llama.cpp-<version>, or LORA_KIT_LLAMA_CPP), so fresh clones and CI reuse it.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = "0.3.36"  # llama-cpp-python's version; its vendor/llama.cpp is the llama.cpp the kit uses
TOOLS = ("llama-quantize", "llama-completion")
HOME_VARIABLE = "LORA_KIT_LLAMA_CPP"  # where the built tools live (default: under ~/.cache/lora-kit)
SOURCE_VARIABLE = "LORA_KIT_LLAMA_CPP_SOURCE"  # a local sdist or trimmed source archive: no download
SOURCE_ARCHIVE = "llama.cpp-source.tar.xz"  # the trimmed source, kept beside the tools to rebuild elsewhere
# Portable: without GGML_NATIVE the x86 build targets AVX2/FMA/F16C/BMI2 (any x86-64 CPU since about 2015,
# AMD EPYC and Colab's Xeons included) instead of the build machine's own instructions. Static: the binaries
# need no library of the build tree. No OpenSSL: nothing is downloaded by the tools.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DGGML_CCACHE=OFF")
REQUIRED_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi2")  # what that portable x86 build executes
# What of vendor/llama.cpp the build and the converters need (the rest is docs, test models, the web UI: 150 MB).
SOURCE_PARTS = ("CMakeLists.txt", "LICENSE", "cmake", "common", "ggml", "include", "src", "vendor", "licenses",
                "tools", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
SOURCE_LEFT_OUT = ("tools/ui", "tools/server")  # only built with LLAMA_BUILD_SERVER
PYTHON_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")


def home() -> Path:
    """The folder the built tools live in: LORA_KIT_LLAMA_CPP, or ~/.cache/lora-kit/llama.cpp-<version>."""
    chosen = os.environ.get(HOME_VARIABLE)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "lora-kit" / f"llama.cpp-{VERSION}"


def is_built(folder: Path | None = None) -> bool:
    """Whether the tools are complete there (a folder is only ever renamed into place whole)."""
    folder = folder or home()
    return (folder / "build.json").is_file() and all((folder / "bin" / name).is_file() for name in TOOLS)


def cpu_problem() -> str | None:
    """Why the portable build cannot run on this CPU (an x86 CPU without AVX2 and its companions), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return None  # not Linux: nothing to read, the build itself will tell
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in flags]
    return (f"this CPU lacks {', '.join(missing)}, which the portable llama.cpp build uses; build llama.cpp "
            f"natively and set {HOME_VARIABLE} to a folder with bin/ holding {' and '.join(TOOLS)}") if missing else None


def tool(name: str) -> Path:
    """The path of one built llama.cpp binary (building the tools first when they are not cached)."""
    if name not in TOOLS:
        raise ValueError(f"llama.cpp tool {name!r} is not built by the kit; choose one of: {', '.join(TOOLS)}")
    return ensure_built() / "bin" / name


def script(name: str) -> Path:
    """The path of one of llama.cpp's Python converters of the same version (building the tools if needed)."""
    if name not in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        raise ValueError(f"llama.cpp script {name!r} is unknown; choose one of: convert_hf_to_gguf.py, "
                         "convert_lora_to_gguf.py")
    return ensure_built() / "llama.cpp" / name


def ensure_built(jobs: int | None = None) -> Path:
    """The tools' folder, built first when it is not complete there (minutes; logged as it goes)."""
    folder = home()
    if is_built(folder):
        return folder
    problem = cpu_problem()
    if problem:
        raise RuntimeError(problem)
    return build(folder, jobs)


def build(folder: Path, jobs: int | None = None) -> Path:
    """Fetch llama.cpp's source, build the tools in a temporary folder beside `folder`, and rename it into place."""
    for program in ("cmake", "c++"):
        if shutil.which(program) is None:
            raise RuntimeError(f"building llama.cpp needs {program}, which is not installed (apt-get install cmake "
                               "g++ on Debian/Ubuntu; Colab has both)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.building-") as temporary:
        work = Path(temporary)
        archive = work / "out" / SOURCE_ARCHIVE
        archive.parent.mkdir()
        # built from the trimmed source it keeps, as a machine without network builds from a copy of it
        pack_source(_unpack_source(_source_file(work), work / "full"), archive)
        shutil.rmtree(work / "full")
        source = _unpack_source(archive, work / "source")
        jobs = jobs or os.cpu_count() or 1
        log.info("building %s with cmake on %d jobs (once: 5-15 minutes on 2 cores)", ", ".join(TOOLS), jobs)
        _run(["cmake", "-S", str(source), "-B", str(work / "build"), *CMAKE_OPTIONS], "configuring llama.cpp")
        _run(["cmake", "--build", str(work / "build"), "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
             "building llama.cpp")
        (work / "out" / "bin").mkdir()
        for name in TOOLS:
            shutil.copy2(work / "build" / "bin" / name, work / "out" / "bin" / name)
        (work / "out" / "llama.cpp").mkdir()
        for part in PYTHON_PARTS:
            copy = shutil.copytree if (source / part).is_dir() else shutil.copy2
            copy(source / part, work / "out" / "llama.cpp" / part)
        record = {"llama_cpp_python": VERSION, "cmake_options": list(CMAKE_OPTIONS), "jobs": jobs,
                  "seconds": round(time.perf_counter() - started, 1), "machine": platform.machine(),
                  "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (work / "out" / "build.json").write_text(json.dumps(record, indent=2))
        try:
            (work / "out").rename(folder)
        except OSError:
            if not is_built(folder):  # another process finished first: theirs is as good; else a real failure
                raise
    log.info("llama.cpp tools built in %.0f s at %s", time.perf_counter() - started, folder)
    return folder


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed ({' '.join(command[:3])} ...):\n{tail}")


def _source_file(work: Path) -> Path:
    """The local source archive named by LORA_KIT_LLAMA_CPP_SOURCE, or the sdist downloaded by pip."""
    local = os.environ.get(SOURCE_VARIABLE)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{SOURCE_VARIABLE}={local} is not a file; point it at llama_cpp_python-"
                                    f"{VERSION}.tar.gz or a {SOURCE_ARCHIVE} made by `python -m helpers.llama_cpp pack`")
        return path
    log.info("downloading llama-cpp-python==%s's source distribution from PyPI (77 MB)", VERSION)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={VERSION}", "-d", str(work / "download")]
    _run(command, "downloading llama-cpp-python's source (pip needs PyPI; offline, set "
                  f"{SOURCE_VARIABLE} to a local copy)")
    return next((work / "download").glob("llama_cpp_python-*.tar.gz"))


def _unpack_source(archive: Path, into: Path) -> Path:
    """Extract archive (the sdist or a trimmed archive) and return its llama.cpp folder."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    found = [p.parent for p in into.rglob("convert_lora_to_gguf.py") if (p.parent / "CMakeLists.txt").is_file()]
    if len(found) != 1:
        raise RuntimeError(f"{archive} holds no single llama.cpp source tree (found {len(found)})")
    return found[0]


def pack_source(source: Path, archive: Path) -> Path:
    """Write llama.cpp's source minus what the tools and converters never use to archive (about 7 MB, xz)."""
    left_out = {source / part for part in SOURCE_LEFT_OUT}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        path = source.parent / info.name
        return None if path in left_out or "__pycache__" in info.name else info

    with tarfile.open(archive, "w:xz") as tar:
        for part in SOURCE_PARTS:
            tar.add(source / part, arcname=f"{source.name}/{part}", filter=keep)
    return archive


def _child_memory(pid: int) -> tuple[int, int]:
    """(VmHWM, RssAnon) of a running process in bytes; zeros once it has exited."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "RssAnon"):
                fields[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields.get("VmHWM", 0), fields.get("RssAnon", 0)


def run_measured(command: list[str], what: str, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> dict[str, Any]:
    """Run a command to its end and return its stdout, stderr, seconds and peak memory; raise naming `what` and
    the end of its log when it fails. The peaks are the process's own (VmHWM and RssAnon of /proc/<pid>/status,
    read every 50 ms): wait4's ru_maxrss would count the parent's memory a forked child starts with."""
    # Threads that wait passively: OpenMP's default spinning makes llama.cpp ten times slower or worse where the
    # cores are shared (measured on this 2-core machine under load: 22.7 s against 0.9 s for 32 tokens of SmolLM2).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **(env if env is not None else os.environ)}
    peak_rss = peak_anon = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        try:
            while process.poll() is None:  # Popen returns once the command is exec'd: what is read is its own
                rss, anon = _child_memory(process.pid)
                peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
                time.sleep(0.05)
        except BaseException:
            process.kill()
            process.wait()
            raise
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    if process.returncode != 0:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-10:])
        raise RuntimeError(f"{what} failed (exit {process.returncode}): {tail}")
    return {"stdout": stdout, "stderr": stderr, "seconds": round(seconds, 2),
            "peak_rss_gib": round(peak_rss / 2**30, 3), "peak_anon_gib": round(peak_anon / 2**30, 3)}


def measured(done: dict[str, Any]) -> dict[str, Any]:
    """The seconds and peak memory of a run_measured result."""
    return {key: done[key] for key in ("seconds", "peak_rss_gib", "peak_anon_gib")}


def completion(model: Path, prompt: str, max_tokens: int, lora: Path | None = None, seed: int = 3407,
               threads: int | None = None) -> dict[str, Any]:
    """llama.cpp's greedy answer to prompt (the exact text, special tokens parsed): its text, whether it stopped
    at an end-of-generation token, the prompt's token ids as llama.cpp read them, seconds and peak memory."""
    context = 4096  # a 128k-context model would otherwise reserve a KV cache for 128k tokens
    command = [str(tool("llama-completion")), "-m", str(model), "-p", prompt, "--no-escape", "-n", str(max_tokens),
               "--temp", "0", "--seed", str(seed), "-c", str(context), "-t", str(threads or os.cpu_count() or 1),
               "-no-cnv", "--no-display-prompt", "--simple-io", "--verbose-prompt", "--no-warmup"]
    if lora is not None:
        command += ["--lora", str(lora)]
    done = run_measured(command, f"llama-completion on {Path(model).name}")
    # stdout: the answer, " [end of text]\n" where it stopped at an end-of-generation token, then "\n\n"
    text = done["stdout"].removesuffix("\n\n")
    stopped = text.endswith(" [end of text]\n")
    return {"text": text.removesuffix(" [end of text]\n"), "stopped_at_eos": stopped,
            "prompt_ids": _prompt_ids(done["stderr"]), **measured(done)}


def _prompt_ids(log_text: str) -> list[int]:
    """The prompt's token ids from llama-completion's --verbose-prompt listing: after 'number of tokens in prompt
    = N', N lines ending in '<id> -> '<piece>'' (a piece holding a newline continues on the next line)."""
    counted = re.search(r"number of tokens in prompt = (\d+)", log_text)
    if counted is None:
        return []
    ids = [int(m.group(1)) for m in re.finditer(r"^.*? I\s+(\d+) -> '", log_text[counted.end():], re.MULTILINE)]
    return ids[: int(counted.group(1))]


def quantize(source: Path, target: Path, quantization: str) -> dict[str, Any]:
    """Quantize a 16-bit GGUF file into target with llama-quantize (k-quants: q4_k_m, q5_k_m, ...); returns its
    seconds and peak memory."""
    done = run_measured([str(tool("llama-quantize")), str(source), str(target), quantization.upper(),
                         str(os.cpu_count() or 1)], f"llama-quantize to {quantization}")
    return measured(done)


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description="Build llama.cpp's tools once (cached), or pack its trimmed source.")
    parser.add_argument("action", choices=["build", "pack", "where"],
                        help="build: the tools into the cache; pack: copy the trimmed source archive to --out "
                             "(to build on a machine without network); where: print the tools' folder")
    parser.add_argument("--out", type=Path, help="pack: where to write the archive")
    parser.add_argument("--jobs", type=int, help="build: parallel compile jobs (default: every core)")
    args = parser.parse_args()
    if args.action == "build":
        print(ensure_built(args.jobs))
    elif args.action == "pack":
        if args.out is None:
            parser.error("pack needs --out")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print(shutil.copy2(ensure_built(args.jobs) / SOURCE_ARCHIVE, args.out))
    else:
        print(home())
