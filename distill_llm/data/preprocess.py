"""Raw text -> Megatron indexed dataset (`<prefix>.bin` + `<prefix>.idx`), the format the data
module trains on.

    python -m distill_llm.preprocess --input corpus.jsonl more/*.txt \\
        --output-prefix data/corpus --tokenizer path/to/tokenizer --workers 4

or `preprocess(...)` from Python. Inputs are JSONL files (one JSON object per line, the text
under `text_key`; `.gz` allowed) or plain-text files (documents separated by blank lines), one
or many, given as files, directories or glob patterns. Each document is tokenized, the
end-of-document id appended, and written with megatron-core's IndexedDatasetBuilder. A
`<prefix>.meta.json` beside them records the tokenizer (so training can refuse data made with
another one) and the counts.

Outputs appear atomically: everything is written under temporary names and renamed at the end,
`.idx` last, so a crash leaves no `.idx` next to a half-written `.bin`.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Union

import numpy as np

from distill_llm.data.corpus import expand_inputs, raw_records, text_of
from distill_llm.data.tokenizer import Tokenizer, load_tokenizer
from distill_llm.errors import ConfigError, cli_status

META_SUFFIX = ".meta.json"
_BATCH_BYTES = 1 << 20  # raw text per work item: large enough to amortise inter-process traffic


@dataclass
class PreprocessSummary:
    """What one preprocessing run wrote."""

    output_prefix: str
    documents: int  # documents written (each ends with the EOD id)
    skipped_empty: int  # documents whose text was empty or whitespace
    tokens: int  # tokens written, EOD ids included
    text_bytes: int  # UTF-8 bytes of document text read
    seconds: float
    workers: int

    @property
    def tokens_per_s(self) -> float:
        """Tokens written per second of wall time."""
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10^6 bytes) of document text read per second of wall time."""
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


# -- the encoding work, run in worker processes (or inline with workers=1) ---------------------
_worker: dict = {}


def _init_worker(tokenizer_path: str, text_key: str, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, as asked for
    _worker.update(tok=load_tokenizer(tokenizer_path), text_key=text_key, dtype=np.dtype(dtype))


def _encode(batch: list[tuple]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Tokens of a batch of records, concatenated with EOD after each document, their
    per-document lengths, the text bytes read and the number of empty documents skipped."""
    tok: Tokenizer = _worker["tok"]
    texts = [text_of(r, _worker["text_key"]) for r in batch]
    kept = [t for t in texts if t.strip()]
    ids = tok.encode_batch(kept) if kept else []
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=_worker["dtype"])
    pos = 0
    for x in ids:
        flat[pos : pos + len(x)] = x
        flat[pos + len(x)] = tok.eod
        pos += len(x) + 1
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return flat, lengths, text_bytes, len(texts) - len(kept)


def _batches(files: list[Path]) -> Iterator[tuple[list[tuple], int]]:
    batch, size = [], 0
    for record in raw_records(files):
        batch.append(record)
        size += record[4]
        if size >= _BATCH_BYTES:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def _encoded(files: list[Path], tok: Tokenizer, text_key: str, dtype, workers: int):
    """Encoded batches in input order, with at most 2 x workers batches in flight."""
    init = (tok.path, text_key, np.dtype(dtype).name)
    if workers == 1:
        _init_worker(*init)
        for batch, size in _batches(files):
            yield _encode(batch), size
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork where there is one: spawn would re-run the caller's __main__ (a notebook, a script
    # without a main guard, stdin) in every worker. Workers set TOKENIZERS_PARALLELISM=false.
    # An executor rather than a Pool: a worker that dies (out of memory) fails the run instead
    # of hanging it.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=init
    ) as pool:
        pending: deque = deque()
        try:
            for batch, size in _batches(files):
                pending.append((pool.submit(_encode, batch), size))
                if len(pending) >= 2 * workers:
                    job, n = pending.popleft()
                    yield job.result(), n
            while pending:
                job, n = pending.popleft()
                yield job.result(), n
        except BrokenProcessPool:
            raise RuntimeError(
                "a tokenizer worker process died (out of memory?); try fewer workers"
            ) from None
        finally:
            for job, _ in pending:
                job.cancel()


def _clear_stale_temporaries(prefix: Path) -> None:
    """Remove temporaries of earlier runs on this prefix whose process is gone (a crash)."""
    for f in prefix.parent.glob(prefix.name + ".*.tmp.*"):
        pid = f.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            f.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def preprocess(
    input: Union[str, List[str]],
    output_prefix: str,
    tokenizer: Union[str, Tokenizer],
    text_key: str = "text",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize `input` into the Megatron indexed dataset `<output_prefix>.bin/.idx`.

    `workers` processes tokenize in parallel (documents keep their input order). Refuses to
    replace existing outputs unless `overwrite`. Returns the counts, also printed at the end.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    files = expand_inputs(input)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    prefix = Path(output_prefix)
    outputs = {k: Path(f"{prefix}{k}") for k in (".bin", ".idx", META_SUFFIX)}
    clash = {f.resolve() for f in files} & {o.resolve() for o in outputs.values()}
    if clash:
        raise ConfigError(f"output {clash.pop()} is also an input; choose another output_prefix")
    existing = [str(o) for o in outputs.values() if o.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]} already exists; pass overwrite=True (--overwrite) or another prefix"
        )
    if not prefix.parent.is_dir():
        prefix.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(prefix)

    dtype = DType.optimal_dtype(tok.vocab_size)
    tmp = {k: Path(f"{prefix}{k}.tmp.{os.getpid()}") for k in outputs}
    total_bytes = sum(f.stat().st_size for f in files)
    docs = skipped = tokens = text_bytes = 0
    start = time.perf_counter()
    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc=f"tokenizing {len(files)} file(s)",
        disable=not progress,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
        file=sys.stderr,
    )
    try:
        builder = IndexedDatasetBuilder(str(tmp[".bin"]), dtype=dtype)
        for (flat, lengths, nbytes, nskip), raw_size in _encoded(
            files, tok, text_key, dtype, workers
        ):
            pos = 0
            for n in lengths.tolist():
                builder.add_document(flat[pos : pos + n], [n])
                pos += n
            docs += len(lengths)
            tokens += len(flat)
            skipped += nskip
            text_bytes += nbytes
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tok/s")
            bar.update(raw_size)
        bar.close()
        if docs == 0:
            raise ConfigError(f"no non-empty documents in {', '.join(map(str, files))}")
        builder.finalize(str(tmp[".idx"]))
        seconds = time.perf_counter() - start
        summary = PreprocessSummary(
            str(prefix), docs, skipped, tokens, text_bytes, seconds, workers
        )
        meta = {
            "tokenizer": tok.describe(),
            "dtype": np.dtype(dtype).name,
            "inputs": [str(f) for f in files],
            "text_key": text_key,
            **{k: v for k, v in asdict(summary).items() if k not in ("output_prefix", "seconds")},
        }
        tmp[META_SUFFIX].write_text(json.dumps(meta, indent=2))
        for f in tmp.values():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        # Publish: drop an old .idx first, so no crash can pair it with the new .bin; the new
        # .idx goes last and marks the dataset complete.
        outputs[".idx"].unlink(missing_ok=True)
        os.replace(tmp[".bin"], outputs[".bin"])
        os.replace(tmp[META_SUFFIX], outputs[META_SUFFIX])
        os.replace(tmp[".idx"], outputs[".idx"])
    except BaseException:
        bar.close()
        for f in tmp.values():
            f.unlink(missing_ok=True)
        raise
    if progress:
        print(
            f"wrote {prefix}.bin/.idx: {docs:,} documents ({skipped:,} empty skipped), "
            f"{tokens:,} tokens from {text_bytes / 1e6:,.1f} MB of text in {seconds:.1f} s "
            f"({summary.tokens_per_s:,.0f} tokens/s, {summary.mb_per_s:.2f} MB/s, "
            f"{workers} worker(s))",
            flush=True,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    """The `python -m distill_llm.preprocess` command line: 0 on success, 2 with one `error:`
    line for a ConfigError."""
    parser = argparse.ArgumentParser(
        prog="python -m distill_llm.preprocess",
        description="Tokenize JSONL or text files into a Megatron indexed dataset.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument(
        "--tokenizer", required=True, help="HF tokenizer dir or SentencePiece .model"
    )
    parser.add_argument("--text-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    import warnings

    # megatron-core warns at import that TE/Apex are absent; irrelevant to tokenizing
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    return cli_status(
        lambda: preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer,
            text_key=args.text_key,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
