"""Tokenizers behind one interface: Hugging Face tokenizer directories, SentencePiece models,
and training a new byte-level BPE tokenizer locally.

    tok = load_tokenizer("path/to/hf_dir")        # tokenizer.json (+ tokenizer_config.json)
    tok = load_tokenizer("path/to/tokenizer.model")  # SentencePiece
    train_bpe_tokenizer(["corpus.jsonl"], "my_tok", vocab_size=8000)  # writes an HF directory

Every tokenizer encodes without adding special tokens; the preprocessor appends the end-of-
document id (`eod`) itself, so document boundaries are explicit in the token stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from distill_llm.data.corpus import expand_inputs, iter_documents
from distill_llm.errors import ConfigError, cli_status

HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
# Special tokens of the tokenizers `train_bpe_tokenizer` writes.
BPE_EOD = "<|endoftext|>"
BPE_PAD = "<|pad|>"
# End-of-text spellings of common model families, tried when a directory names no eos token.
_EOS_GUESSES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class Tokenizer:
    """What the rest of the package needs from a tokenizer.

    `vocab_size` counts every id the tokenizer can produce (added tokens included); `eod` ends a
    document; `bos` and `pad` are None when the tokenizer has none. `fingerprint` identifies the
    tokenizer files' content, so data can be matched to the tokenizer that made it.
    """

    kind: str
    path: str
    vocab_size: int
    eod: int
    bos: int | None
    pad: int | None
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text in `texts` (one `encode` call each, unless overridden)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text the token ids `ids` stand for."""
        raise NotImplementedError

    def pieces(self) -> list[str]:
        """Every token's string, indexed by id."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Identity of this tokenizer, stored next to preprocessed data."""
        return {
            "kind": self.kind,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def vocabulary_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """None when `a` and `b` give every shared id the same token; else where they first differ."""
    pa, pb = a.pieces(), b.pieces()
    for i, (x, y) in enumerate(zip(pa, pb)):
        if x != y:
            return f"id {i} is {x!r} in one and {y!r} in the other"
    return None


def _fingerprint(file: Path, eod: int) -> str:
    """What decides the token stream: the vocabulary/merges file and the end-of-document id
    (not chat templates or other settings a tokenizer_config.json may change)."""
    digest = hashlib.sha256(file.read_bytes())
    digest.update(f"eod={eod}".encode())
    return digest.hexdigest()[:16]


def _token_text(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(directory: Path) -> dict[str, str]:
    """eos/bos/pad token strings named by tokenizer_config.json or special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        f = directory / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{f} is not valid JSON ({err}); repair or remove it") from None
        for key in ("eos_token", "bos_token", "pad_token"):
            text = _token_text(cfg.get(key))
            if text:
                found[key] = text
    return found


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer directory (`tokenizer.json`, read with `tokenizers`)."""

    kind = "huggingface"

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        directory = Path(directory)
        file = directory / HF_FILE
        try:
            self._tok = RustTokenizer.from_file(str(file))
        except Exception as err:  # the Rust loader raises a bare Exception
            raise ConfigError(f"{file} is not a readable tokenizers file ({err})") from None
        self.path = str(directory)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        specials = _special_tokens(directory)
        eos = specials.get("eos_token")
        if eos is None:
            eos = next((t for t in _EOS_GUESSES if self._tok.token_to_id(t) is not None), None)
        if eos is None or self._tok.token_to_id(eos) is None:
            raise ConfigError(
                f'{directory}: no end-of-document token found; set "eos_token" in '
                f"{directory / 'tokenizer_config.json'} to one of the tokenizer's special tokens"
            )
        self.eod = self._tok.token_to_id(eos)
        self.bos = self._id_or_none(specials.get("bos_token"))
        self.pad = self._id_or_none(specials.get("pad_token"))
        self.fingerprint = _fingerprint(file, self.eod)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` from `tokenizer.json`, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text in `texts`, in one batched `tokenizers` call, without special
        tokens."""
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids `ids`, special tokens left in."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def pieces(self) -> list[str]:
        """Every token's string (added tokens included), indexed by id; "" for an unused id."""
        by_id = {i: t for t, i in self._tok.get_vocab(with_added_tokens=True).items()}
        return [by_id.get(i, "") for i in range(self.vocab_size)]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (the seed's `tokenizer.model`)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path, specials: dict[str, str] | None = None):
        import sentencepiece

        model_file = Path(model_file)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(model_file))
        except (OSError, RuntimeError) as err:
            raise ConfigError(f"{model_file} is not a SentencePiece model ({err})") from None
        self.path = str(model_file)
        self.vocab_size = self._sp.GetPieceSize()
        specials = specials or {}
        self.eod = self._piece_id(specials.get("eos_token"), self._sp.eos_id())
        if self.eod is None:
            raise ConfigError(
                f"{model_file} defines no end-of-sentence piece (eos_id = -1); train it with "
                'eos_id >= 0 or name one as "eos_token" in tokenizer_config.json beside it'
            )
        self.bos = self._piece_id(specials.get("bos_token"), self._sp.bos_id())
        self.pad = self._piece_id(specials.get("pad_token"), self._sp.pad_id())
        self.fingerprint = _fingerprint(model_file, self.eod)

    def _piece_id(self, piece: str | None, default: int) -> int | None:
        if piece is not None:
            pid = self._sp.PieceToId(piece)
            if self._sp.IdToPiece(pid) == piece:
                return pid
        return default if default >= 0 else None

    def pieces(self) -> list[str]:
        """Every piece's string, indexed by id."""
        return [self._sp.IdToPiece(i) for i in range(self.vocab_size)]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self._sp.Encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text in `texts`, in one SentencePiece call."""
        return self._sp.Encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids `ids`."""
        return self._sp.Decode(list(int(i) for i in ids))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a Hugging Face directory, or a SentencePiece `.model` file (or a
    directory holding only `tokenizer.model`)."""
    p = Path(path)
    if p.is_dir():
        if (p / HF_FILE).is_file():
            return HFTokenizer(p)
        if (p / SP_FILE).is_file():
            return SentencePieceTokenizer(p / SP_FILE, _special_tokens(p))
        raise ConfigError(
            f"tokenizer directory {p} has neither {HF_FILE} nor {SP_FILE}; point at a Hugging "
            "Face tokenizer directory or a SentencePiece .model file"
        )
    if p.is_file():
        if p.name == HF_FILE:
            return HFTokenizer(p.parent)
        return SentencePieceTokenizer(p, _special_tokens(p.parent))
    raise ConfigError(f"tokenizer {p} does not exist; give a tokenizer directory or .model file")


def _texts_of(files: list[Path], text_key: str) -> Iterator[str]:

    for _, _, text in iter_documents(files, text_key):
        yield text


def train_bpe_tokenizer(
    files: list[str] | str,
    output_dir: str,
    vocab_size: int = 8192,
    text_key: str = "text",
    min_frequency: int = 2,
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer on local text and save it as a Hugging Face directory.

    `files` are JSONL (documents under `text_key`) or plain-text files, as for `preprocess`.
    The directory holds `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`
    (loadable by `transformers.AutoTokenizer` too); `<|endoftext|>` ends documents and
    `<|pad|>` pads. Byte-level BPE round-trips any text exactly.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ConfigError(f"vocab_size {vocab_size} is too small: 256 bytes + specials need 300+")
    inputs = expand_inputs(files)
    out = Path(output_dir)
    if (out / HF_FILE).exists():
        raise ConfigError(f"{out / HF_FILE} already exists; choose another output_dir")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BPE_EOD, BPE_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts_of(inputs, text_key), trainer)
    specials = {"eos_token": BPE_EOD, "bos_token": BPE_EOD, "pad_token": BPE_PAD}
    # Write into a temporary directory, then rename: a crash leaves no half-made tokenizer.
    tmp = out.with_name(out.name + f".tmp.{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp / HF_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    if out.exists():  # an existing empty or unrelated directory: move the files in
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, out)
    return HFTokenizer(out)


def main(argv: list[str] | None = None) -> int:
    """The `python -m distill_llm.tokenizer` command line (train a BPE tokenizer): 0 on success,
    2 with one `error:` line for a ConfigError."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m distill_llm.tokenizer",
        description="Train a byte-level BPE tokenizer on local JSONL or text files.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    parser.add_argument("--output-dir", required=True, help="the new Hugging Face tokenizer dir")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--text-key", default="text", help="JSONL field holding the text")
    args = parser.parse_args(argv)

    def train() -> None:
        tok = train_bpe_tokenizer(args.input, args.output_dir, args.vocab_size, args.text_key)
        print(f"wrote {tok.path}: {tok.vocab_size} tokens, end-of-document id {tok.eod}")

    return cli_status(train)


if __name__ == "__main__":
    raise SystemExit(main())
