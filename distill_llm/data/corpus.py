"""Corpus readers: which files a list of paths and globs names, and the documents in them
(JSONL/JSON records with a text field, or plain text files; gzip either way)."""

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from distill_llm.errors import ConfigError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


TEXT_SUFFIXES = (".txt", ".txt.gz")


def expand_inputs(inputs: str | list[str]) -> list[Path]:
    """Files named by `inputs` (files, directories of JSONL/text files, glob patterns), sorted
    within each entry, in the given order."""
    entries = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not entries:
        raise ConfigError("no input files given; pass one or more JSONL or text files")
    files: list[Path] = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            found = sorted(
                f
                for f in p.iterdir()
                if f.is_file() and f.name.endswith(JSON_SUFFIXES + TEXT_SUFFIXES)
            )
            if not found:
                raise ConfigError(f"input directory {p} holds no .jsonl/.json/.txt files")
            files += found
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(str(entry)):
            found = sorted(Path(f) for f in glob.glob(str(entry)) if Path(f).is_file())
            if not found:
                raise ConfigError(f"input pattern {entry} matches no files")
            files += found
        else:
            raise ConfigError(f"input {p} does not exist")
    return files


def _is_json(path: Path) -> bool:
    return path.name.endswith(JSON_SUFFIXES)


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def raw_records(files: list[Path]) -> Iterator[tuple[str, int, str, bool, int]]:
    """(file, first line number, raw record, is_json, size in bytes) for every document: a
    line of a JSONL file, or a blank-line-separated paragraph of a text file."""
    for path in files:
        is_json = _is_json(path)
        try:
            with _open_text(path) as f:
                if is_json:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            yield str(path), n, line, True, len(line)
                    continue
                para: list[str] = []
                start = 1
                for n, line in enumerate(f, 1):
                    if line.strip():
                        if not para:
                            start = n
                        para.append(line)
                    elif para:
                        text = "".join(para)
                        yield str(path), start, text, False, len(text)
                        para = []
                if para:
                    text = "".join(para)
                    yield str(path), start, text, False, len(text)
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path} is not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None


def text_of(record: tuple[str, int, str, bool, int], text_key: str) -> str:
    """The document text of a `raw_records` record: a text paragraph without its final newline,
    or a JSON line's `text_key` field; ConfigError naming file:line when that is missing or bad."""
    path, line, raw, is_json, _ = record
    if not is_json:
        return raw.rstrip("\n")
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}:{line}: not valid JSON ({err.msg}); fix or drop the line"
        ) from None
    if not isinstance(obj, dict) or text_key not in obj:
        fields = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(
            f"{path}:{line}: no {text_key!r} field (found: {fields}); pass text_key=<field>"
        )
    text = obj[text_key]
    if not isinstance(text, str):
        raise ConfigError(f"{path}:{line}: field {text_key!r} is {type(text).__name__}, not text")
    return text


def iter_documents(files: list[Path], text_key: str = "text") -> Iterator[tuple[str, int, str]]:
    """(file, line, text) of every non-empty document in `files`, in order."""
    for record in raw_records(files):
        text = text_of(record, text_key)
        if text.strip():
            yield record[0], record[1], text
