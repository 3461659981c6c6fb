"""Shared helpers: tiny architectures and a launcher for tests/worker.py under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"

# The two longest files (a small quickstart, a shortened example: 2-3 minutes each) are
# collected first: with two files at a time (`make test`), collected last they would end the
# run alone on one worker while the other idles.
LONGEST_FIRST = ("test_quickstart.py", "test_smollm2_example.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest as is


# A tiny teacher and a smaller student that share a 1000-token vocabulary (padded to 1024).
TEACHER = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=1000,
    max_seq_length=64,
)
STUDENT = dict(
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=1000,
    max_seq_length=64,
)


def run_worker(
    tmp_path: Path,
    ops: list,
    nproc: int = 1,
    kill: dict | None = None,
    expect_ok: bool = True,
    timeout: int = 600,
    teacher_out: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `ops` in tests/worker.py with `nproc` processes (torchrun, gloo)."""
    body = {"ops": ops, "kill": kill or {}, "teacher_out": teacher_out}
    spec = tmp_path / f"spec_{abs(hash(json.dumps(body, sort_keys=True)))}.json"
    spec.write_text(json.dumps(body))
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(WORKER),
            str(spec),
        ]
    else:
        cmd = [sys.executable, str(WORKER), str(spec)]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    if expect_ok and proc.returncode != 0:
        pytest.fail(
            f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def train_cfg(**overrides) -> dict:
    cfg = dict(
        steps=3,
        micro_batch_size=2,
        global_batch_size=4,
        seq_length=32,
        val_every=0,
        val_batches=1,
        log_every=1,
        seed=1234,
    )
    cfg.update(overrides)
    return cfg


OPTIM = dict(lr=1e-3, min_lr=1e-4, warmup_steps=1)


# A SentencePiece tokenizer NeMo itself stored in a .nemo file (tests/fixtures/nemo).
SP_TOKENIZER = ROOT / "tests" / "fixtures" / "nemo" / "hf_llama_sp" / "tokenizer.model"
WORDS = "the a river stone light moves over quiet hills and every small bird sings".split()


def sp_data(tmp_path) -> str:
    """Text tokenized with the teacher's SentencePiece model, without our .meta.json (as data
    made by NeMo's own preprocessing script is)."""
    from distill_llm.preprocess import preprocess

    gen = torch.Generator().manual_seed(1)
    docs = []
    for _ in range(300):
        picks = torch.randint(0, len(WORDS), (int(torch.randint(8, 30, (1,), generator=gen)),),
                              generator=gen)  # fmt: skip
        docs.append({"text": " ".join(WORDS[i] for i in picks)})
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in docs))
    prefix = tmp_path / "data"
    preprocess(str(src), str(prefix), str(SP_TOKENIZER), progress=False)
    (tmp_path / "data.meta.json").unlink()
    return str(prefix)
