"""The pruned model on disk: a normal checkpoint (`engine.checkpoint`) with `prune.json` beside
its `distill_llm.json`, written through a staging directory renamed at the end, so the output
directory appears complete or not at all.

prune.json: the teacher (path and architecture), the target as given, the pruned architecture,
the depth method, the calibration (batches, samples, seq_length, seed, the teacher's LM loss on
them), the layer scores of the depth method (None when no layer is dropped), the block
importance of every layer, "iterative_lm_loss"'s removals in order with the LM loss after each
(else None), the hidden method, and the kept indices (`prune.plan.PrunePlan`, teacher
numbering) with the RMSNorm weight factors (`norm_scales`): enough to redo the slicing without
this package. With `hidden_method="pca"` the hidden channels are those of the rotated teacher
(`prune.rotation`: norm weights folded into the linear layers that read them, the stream
rotated by the matrix saved as rotation.pt, whose first `hidden_size` channels are kept), and
`rotation_energy` is the share of the calibration directions those channels carry.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from distill_llm.data.datasets import DataConfig
from distill_llm.engine import checkpoint, parallel
from distill_llm.engine.model import ModelConfig
from distill_llm.formats.hf.config import HF_META_KEY
from distill_llm.formats.hf.io import export_settings
from distill_llm.prune import shape
from distill_llm.prune.importance import Scores
from distill_llm.prune.plan import PrunePlan
from distill_llm.prune.rotation import ROTATION_FILE, energy

RECORD_FILE = "prune.json"


def record(
    *,
    teacher: str,
    teacher_cfg: ModelConfig,
    target: shape.Target,
    student_cfg: ModelConfig,
    depth_method: str,
    calibration: dict,
    scores: Scores,
    plan: PrunePlan,
    hidden_method: str = "activation",
    rotated: bool = False,
) -> dict:
    """prune.json's content (see the module docstring); `calibration`: batches, samples,
    seq_length and seed of the calibration data; `rotated`: the teacher's stream was rotated
    (`hidden_method="pca"` with fewer hidden channels), its channel variances in `scores.hidden`."""
    dropped = student_cfg.num_layers < teacher_cfg.num_layers
    return {
        "teacher": str(Path(teacher).resolve()),
        "teacher_model": teacher_cfg.to_dict(),
        "target": shape.target_record(target),
        "student_model": student_cfg.to_dict(),
        "depth_method": depth_method,
        "calibration": {**calibration, "teacher_loss": scores.calibration_loss},
        "layer_scores": scores.layers(depth_method).tolist() if dropped else None,
        "block_importance": scores.block_importance.tolist(),
        "removals": (
            None
            if scores.removals is None
            else [{"layer": layer, "lm_loss": loss} for layer, loss in scores.removals]
        ),
        "hidden_method": hidden_method,
        "rotation": ROTATION_FILE if rotated else None,
        "rotation_energy": energy(scores.hidden, student_cfg.hidden_size) if rotated else None,
        "kept": plan.to_dict(),
    }


def tokenizer_metadata(teacher: str, data: DataConfig) -> dict:
    """The checkpoint metadata that carries the teacher's HF family, dtype and tokenizer
    (else data.tokenizer, when a directory) to the pruned model: what `export_hf` and the
    tokenizer checks of `distill` read. Empty when the teacher has none of them."""
    family, dtype, tokenizer = export_settings([teacher])
    if tokenizer is None and data.tokenizer and Path(data.tokenizer).is_dir():
        tokenizer = data.tokenizer
    if family is None and tokenizer is None:
        return {}
    found = {"source": str(Path(tokenizer).resolve()) if tokenizer else None}
    if family is not None:
        found.update(family=family, dtype=str(dtype).split(".")[1])
    return {HF_META_KEY: found}


def write(out, model, cfg: ModelConfig, content: dict, metadata: dict, rotation=None) -> None:
    """Save `model` (this rank's shard of the pruned GPTModel for `cfg`, every rank calls) with
    `metadata` in its distill_llm.json, `content` as prune.json and the `rotation` `[h, h]`
    (if any) as rotation.pt (a bare tensor: `torch.load(..., weights_only=True)`) into `out`,
    atomically."""
    out = Path(out)
    staging = out.with_name(f".{out.name}.tmp")
    if parallel.is_main():
        shutil.rmtree(staging, ignore_errors=True)  # a crashed run's leftovers
    parallel.barrier()
    try:
        checkpoint.save_model(staging, model, cfg, step=0, pruned_from=content["teacher"],
                              **metadata)  # fmt: skip
        if parallel.is_main():
            (staging / RECORD_FILE).write_text(json.dumps(content, indent=2))
            if rotation is not None:
                torch.save(rotation.float().contiguous(), staging / ROTATION_FILE)
            os.replace(staging, out)
    finally:
        if parallel.is_main():
            shutil.rmtree(staging, ignore_errors=True)
    parallel.barrier()
