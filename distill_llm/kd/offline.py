"""Offline teacher logits in a run: `cache_teacher`'s pass over the data, and the student's loss
from the cache when `distill(teacher_cache=...)` trains with no teacher in memory.

A cache directory holds `train/` and `valid/` (each a distill_llm.teacher_cache store keyed by
the dataset's sample index) for exactly the sample stream of one `data` + `train` setting:
the same settings give the same samples, so `distill` with them reads every sample it trains
or validates on. What the cache was made from is recorded and checked (see `expected`).

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

import contextlib
import hashlib
import shutil
from pathlib import Path
from typing import Optional

import torch

from distill_llm.data.datasets import collate
from distill_llm.engine import parallel
from distill_llm.engine.model import lm_loss
from distill_llm.errors import ConfigError
from distill_llm.kd import teacher_cache
from distill_llm.kd.criterion import CachedTopK, KDCriterion, masked_sum

SPLITS = ("train", "valid")


def fingerprint(model_path) -> str:
    """A checkpoint or HF directory's identity: every file's name and size, and the contents
    of its small JSON files (configs, step, metadata). Cheap: no tensor data is read."""
    root = Path(model_path)
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(root)}:{f.stat().st_size};".encode())
        if f.suffix == ".json" and f.stat().st_size < 1 << 20:
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def provenance(
    teacher: str, teacher_cfg, data_module, source, data_cfg, samples: dict, teacher_given=True
) -> dict:
    """What a cache is made from; `distill` must find the same to use it. (`data_module` None:
    without the sample stream, which exists only once the datasets are built.)"""
    tokenizers = sorted({str(i.get("tokenizer")) for i in source.identity}) or ["mock"]
    prov = {
        "teacher": str(Path(teacher).resolve()) if teacher_given else teacher,
        "teacher_fingerprint": fingerprint(teacher) if teacher_given else None,
        "teacher_model": teacher_cfg.to_dict(),
        "data_paths": [str(Path(p).resolve()) for p in source.prefixes] or "mock",
        "split": data_cfg.split,
        "tokenizer": ",".join(tokenizers),
        "samples": samples,
    }
    if data_module is not None:  # data files, split, seq_length, seed, number of samples
        prov["data_stream"] = data_module.stream_id
    return prov


def expected(now: dict, teacher: Optional[str], kd, seq_length: int) -> dict:
    """The fields `distill` checks against a cache before anything is built, in the order a
    user thinks of them (`now`: this run's `provenance` without the sample stream)."""
    want = {"temperature": kd.temperature, "seq_length": seq_length}
    if kd.cache_top_k is not None:
        want["k"] = kd.cache_top_k
    if teacher:
        want["teacher"] = now["teacher"]
        want["teacher_fingerprint"] = now["teacher_fingerprint"]
    want.update({k: now[k] for k in ("data_paths", "split", "tokenizer", "samples")})
    return want


def read_provenance(path: str) -> dict:
    """The provenance recorded by a cache directory (ConfigError if it is not one)."""
    return open_caches(path)["train"].meta.get("provenance", {})


def open_caches(path: str) -> dict:
    """The `train` and `valid` TeacherCache of cache directory `path`; ConfigError when it is
    not a teacher cache."""
    root = Path(path)
    if not (root / "train").is_dir() or not (root / "valid").is_dir():
        raise ConfigError(
            f"teacher_cache {path!r} is not a teacher cache (no train/ and valid/ inside); "
            "make one with `nemo distill_llm cache_teacher`"
        )
    return {split: teacher_cache.TeacherCache(root / split) for split in SPLITS}


def write(
    teacher_model,
    teacher_vocab: int,
    data_module,
    output_dir: str,
    *,
    k: int,
    temperature: float,
    dtype: str,
    prov: dict,
    overwrite: bool = False,
) -> None:
    """Run the teacher over every train and validation sample of `data_module`'s stream and
    write the cache (rank 0 writes; data-parallel ranks share the samples, TP ranks a model)."""
    from megatron.core import parallel_state

    tp_group = None
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    micro = data_module.plan.micro_batch_size
    out = Path(output_dir)
    staging = out.with_name(f".{out.name}.tmp")
    teacher_model.eval()
    for split, dataset, n in (
        ("train", data_module.train, prov["samples"]["train"]),
        ("valid", data_module.valid, prov["samples"]["valid"]),
    ):
        ids = list(dict.fromkeys(i % len(dataset) for i in range(n)))  # stream order, once each
        writer = None
        if parallel.is_main():
            writer = teacher_cache.CacheWriter(
                staging / split, k=k, temperature=temperature, vocab_size=teacher_vocab,
                seq_length=data_module.seq_length, provenance=prov, dtype=dtype,
                overwrite=True,
            )  # fmt: skip
        bar = _progress(f"teacher cache ({split})", len(ids))
        for start in range(0, len(ids), micro * dp_size):
            mine = ids[start + dp_rank * micro : start + (dp_rank + 1) * micro]
            part = _top_k(teacher_model, dataset, mine, k, temperature, tp_group, teacher_vocab)
            parts = [None] * dp_size
            torch.distributed.all_gather_object(parts, part, group=dp_group)
            if writer is not None:
                for piece in parts:
                    if piece is not None:
                        writer.add(*piece)
            if bar is not None:
                bar.update(min(micro * dp_size, len(ids) - start))
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    parallel.barrier()
    if parallel.is_main():
        shutil.rmtree(staging / "data_cache", ignore_errors=True)  # megatron's index caches
        old = out.with_name(f".{out.name}.old")
        if overwrite and out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()


def _progress(what: str, total: int):
    if not parallel.is_main():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="sample", mininterval=2.0)


@torch.no_grad()
def _top_k(model, dataset, ids: list, k: int, temperature: float, group, vocab_limit: int):
    if not ids:
        return None
    batch = collate([dataset[i] for i in ids])
    tokens, positions = batch["tokens"], batch["position_ids"]
    if torch.cuda.is_available():
        tokens, positions = tokens.cuda(), positions.cuda()
    logits = model(tokens, positions, None)  # [b, s, V/TP]
    log_probs, indices, rest = teacher_cache.topk_log_probs(
        logits, k, temperature, group=group, vocab_limit=vocab_limit
    )
    return (torch.tensor(ids), log_probs.cpu(), indices.cpu(), rest.cpu(), batch["tokens"])


class CachedTeacher:
    """The KD loss from a teacher cache, for the training loop: the run's `KDCriterion` fed by
    the cache's top-k rows (`CachedTopK`) instead of a live teacher's logits."""

    wants_logits = True  # the model's forward returns logits, not its LM loss

    def __init__(self, caches: dict, kd, shared_vocab: int, student=None):
        self.caches = caches
        self.student = student
        self.criterion = KDCriterion(kd, shared_vocab)
        self.balancer = self.criterion.balancer()

    def student_only(self):
        """Saving the student needs nothing hidden: there is no teacher in memory."""
        return contextlib.nullcontext()

    def adjust_tensor_shapes(self, models, **shapes):
        """No extra activations travel between pipeline stages (cache_teacher needs PP=1)."""
        return None

    def terms(self, logits, batch: dict, training: bool) -> dict:
        """Token sums of this micro-batch: `lm` (the student's CE), `logits` (KD from the cache),
        `intermediate` (0) and `total` (what is backpropagated, mixed like the online path).
        `logits` is the student's output `[b, s, V/TP]` on the last pipeline stage."""
        # heavy; the run has loaded both already
        from megatron.core import parallel_state
        from modelopt.torch.distill.loss_balancers import STUDENT_LOSS_KEY

        kd = self.criterion.kd
        mask = batch["loss_mask"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and kd.lm_in_gradient and training):
            lm = lm_loss(self.student, batch["labels"], logits.transpose(0, 1), copy=True)
        lm_sum = masked_sum(lm, mask)
        split = "train" if training else "valid"
        ids = batch["sample_ids"].cpu().numpy()
        log_probs, indices, rest = (
            t.to(logits.device)
            for t in self.caches[split].lookup(ids, tokens=batch["tokens"].cpu())
        )
        group = None
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            group = parallel_state.get_tensor_model_parallel_group()
        per_token = self.criterion.per_token(logits, CachedTopK(log_probs, indices, rest), group)
        kd_sum = self.criterion.token_sum(per_token, mask, group)
        out = self.balancer({STUDENT_LOSS_KEY: lm_sum, "LogitsKDLoss": kd_sum})
        return {
            "total": out["kd_loss"],
            "lm": lm_sum,
            "logits": out["logits_loss"],
            "intermediate": torch.zeros_like(lm_sum),
        }
