"""Entry points: `distill` (student learns from a frozen teacher), `pretrain` (same loop, no
teacher), `prune` (a student cut from the teacher), `cache_teacher`, `evaluate`. They take plain
dataclass configs, so Fiddle and NeMo-Run can build and launch them.

Launch (one process per tensor-parallel rank, times data-parallel replicas):
    nemo distill_llm distill --factory tiny run.executor=local run.executor.ntasks_per_node=2
(see distill_llm/cli.py and the recipes), or call them from Python inside any script started
with `torchrun --nproc_per_node=N`.
"""

import dataclasses
import itertools
import json
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from distill_llm import checks
from distill_llm.checks import default_student
from distill_llm.data.datasets import BatchPlan, DataConfig, DataModule
from distill_llm.engine import checkpoint
from distill_llm.engine import parallel as dist
from distill_llm.engine.model import ModelConfig, build_gpt
from distill_llm.engine.parallel import ParallelConfig
from distill_llm.engine.run_dir import write_config
from distill_llm.engine.training import OptimConfig, TrainConfig, Trainer
from distill_llm.formats import paths
from distill_llm.formats.hf.io import export_checkpoint
from distill_llm.formats.nemo import io as nemo_io
from distill_llm.kd import offline
from distill_llm.kd.config import KDConfig
from distill_llm.prune import importance, output, rotation, shape, slicing
from distill_llm.prune import plan as prune_plan
from distill_llm.prune.shape import PruneTarget

__all__ = [
    "cache_teacher",
    "default_student",
    "distill",
    "evaluate",
    "init_model",
    "pretrain",
    "prune",
]


def _data_module(data, source, train: TrainConfig, dp_size: int, run_path: Path) -> DataModule:
    from megatron.core import parallel_state

    plan = BatchPlan(
        micro_batch_size=train.micro_batch_size,
        global_batch_size=train.global_batch_size,
        data_parallel_size=dp_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
    )
    return DataModule(
        data,
        source,
        seq_length=train.seq_length,
        plan=plan,
        train_samples=train.steps * train.global_batch_size,
        valid_samples=train.val_batches * train.global_batch_size,
        seed=train.seed,
        cache_dir=str(run_path / "data_cache"),
    )


def _fit(model, model_cfg, data, source, train, optim, parallel, run_path, dp_size, teacher=None):
    """Train `model` (a GPT; with `teacher`, the KD side of the loss: kd.wrapper.OnlineTeacher
    or kd.offline.CachedTeacher) to the end of `train`."""
    data_module = _data_module(data, source, train, dp_size, run_path)
    if isinstance(teacher, offline.CachedTeacher):
        teacher.caches["train"].check({"data_stream": data_module.stream_id})
    trainer = Trainer(
        model=model,
        student_cfg=model_cfg,
        data=data_module,
        train=train,
        optim=optim,
        parallel_cfg=parallel,
        run_dir=run_path,
        teacher=teacher,
    )
    return trainer.fit()


def _export(plan: checks.DistillPlan, summary: dict, model_cfg, parallel) -> dict:
    """Write the final model (reloaded from `final/` on the run's layout) as an HF directory
    (TP shards gathered) and/or a NeMo checkpoint (each rank its shard), as `plan` says."""
    hf, nemo = plan.export, plan.export_nemo
    if hf is not None:
        export_checkpoint(summary["final"], model_cfg, hf["dir"], parallel,
                          family=hf["family"], dtype=hf["dtype"],
                          tokenizer=hf["tokenizer"])  # fmt: skip
        if dist.is_main():
            print(f"exported the final model to {hf['dir']} (Hugging Face)", flush=True)
        summary = {**summary, "export_hf": hf["dir"]}
    if nemo is not None:
        nemo_io.export_checkpoint(summary["final"], model_cfg, nemo["path"], parallel,
                                  fmt=nemo["format"], tokenizer=nemo["tokenizer"])  # fmt: skip
        if dist.is_main():
            print(f"exported the final model to {nemo['path']} ({nemo['format']})", flush=True)
        summary = {**summary, "export_nemo": nemo["path"]}
    return summary


def distill(
    teacher: Optional[str] = None,
    student: Optional[ModelConfig] = None,
    student_checkpoint: Optional[str] = None,
    kd: Optional[KDConfig] = None,
    data: Optional[DataConfig] = None,
    train: Optional[TrainConfig] = None,
    optim: Optional[OptimConfig] = None,
    parallel: Optional[ParallelConfig] = None,
    output_dir: str = "runs/distill",
    export_hf: Optional[str] = None,
    teacher_cache: Optional[str] = None,
    export_nemo: Optional[str] = None,
) -> dict:
    """Distil a student from the frozen teacher checkpoint `teacher`; returns a summary.

    With `teacher_cache` (a directory written by `cache_teacher` for the same `data` and
    `train`), the teacher's top-k log-probabilities come from the cache and no teacher is
    loaded; `teacher` may then be omitted, or given to have the cache checked against it.

    `student` is the student architecture; if None it comes from `student_checkpoint`, or, with
    neither, is `default_student(teacher architecture)`. The student starts from
    `student_checkpoint` when given, else from a fresh initialisation. The run writes into
    `output_dir` (the run directory, see distill_llm.run_dir) and resumes from its `latest`
    checkpoint if present. (Not `run_dir`: NeMo-Run's CLI claims every argument starting
    with "run".)
    """
    kd = kd or KDConfig()
    data, train = data or DataConfig(), train or TrainConfig()
    optim, parallel = optim or OptimConfig(), parallel or ParallelConfig()
    # Every check a user can fail runs before any process group or model exists.
    plan = checks.check_distill(
        teacher=teacher, student=student, student_checkpoint=student_checkpoint, kd=kd,
        data=data, train=train, optim=optim, parallel=parallel,
        world_size=dist.world_size_from_env(), teacher_cache=teacher_cache,
        export_hf=export_hf, output_dir=output_dir, export_nemo=export_nemo,
    )  # fmt: skip
    student, teacher_cfg = plan.student, plan.teacher_cfg
    cached = None
    if plan.caches is not None:
        vocab = plan.caches["train"].meta["vocab_size"]
        cached = offline.CachedTeacher(plan.caches, kd, vocab)

    run_path = Path(output_dir)
    dist.initialize(parallel, train.seed)
    write_config(
        run_path,
        {
            "entry_point": "distill",
            "teacher": str(teacher) if teacher else None,
            "teacher_cache": str(teacher_cache) if teacher_cache else None,
            "teacher_model": teacher_cfg.to_dict(),
            "student_model": student.to_dict(),
            "student_checkpoint": student_checkpoint,
            "kd": dataclasses.asdict(kd),
            "data": dataclasses.asdict(data),
            "train": dataclasses.asdict(train),
            "optim": dataclasses.asdict(optim),
            "parallel": dataclasses.asdict(parallel),
        },
    )
    # The student is built first, so a fresh student starts from exactly the weights `pretrain`
    # gives the same architecture and seed (a fair from-scratch baseline).
    model = _build(student, parallel, student_checkpoint, "student")
    if cached is not None:
        cached.student = model
        teacher_side = cached
    else:
        # ModelOpt is heavy to import: only a run with a live teacher loads the wrapper
        from distill_llm.kd import wrapper

        teacher_model = _build(teacher_cfg, parallel, teacher, "teacher")
        model = wrapper.build_distillation_model(model, teacher_model, kd)
        teacher_side = wrapper.OnlineTeacher(model)
    summary = _fit(model, student, data, plan.source, train, optim, parallel, run_path,
                   plan.dp_size, teacher=teacher_side)  # fmt: skip
    return _export(plan, summary, student, parallel)


def _build(cfg: ModelConfig, parallel: ParallelConfig, weights: Optional[str], role: str):
    """This rank's GPTModel for `cfg` on the run's layout, loaded from `weights` when given."""
    model = build_gpt(
        cfg,
        tensor_parallel=parallel.tensor_parallel,
        pipeline_parallel=parallel.pipeline_parallel,
        params_dtype=parallel.params_dtype,
    )
    if weights:
        paths.load_model(weights, model, cfg, role=role)
    return model


def cache_teacher(
    teacher: str,
    output_dir: str,
    k: int = 32,
    temperature: float = 1.0,
    data: Optional[DataConfig] = None,
    train: Optional[TrainConfig] = None,
    parallel: Optional[ParallelConfig] = None,
    dtype: str = "float16",
    vocab_limit: Optional[int] = None,
    overwrite: bool = False,
) -> dict:
    """Run `teacher` once over every sample `distill` with the same `data` and `train` trains
    and validates on, and store its top-`k` log-probabilities (at `temperature`) per position
    in `output_dir` (float16, or float32 `dtype`; ids < `vocab_limit`, default the teacher's
    vocabulary). Then `distill(teacher_cache=output_dir, ...)` needs no teacher in memory.
    Tensor and data parallel as in `distill` (pipeline parallel is not supported here).
    Returns {"cache", "bytes_per_position", "samples"}."""
    data, train = data or DataConfig(), train or TrainConfig()
    parallel = parallel or ParallelConfig()
    teacher_cfg, limit, source, dp_size = checks.check_cache_teacher(
        teacher, output_dir, k=k, temperature=temperature, data=data, train=train,
        parallel=parallel, dtype=dtype, vocab_limit=vocab_limit, overwrite=overwrite,
        world_size=dist.world_size_from_env(),
    )  # fmt: skip
    out = Path(output_dir)
    dist.initialize(parallel, train.seed)
    staging = out.with_name(f".{out.name}.tmp")
    if dist.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)  # a crashed run's leftovers
    dist.barrier()
    model = _build(teacher_cfg, parallel, teacher, "teacher")
    data_module = _data_module(data, source, train, dp_size, staging)
    prov = offline.provenance(
        teacher, teacher_cfg, data_module, source, data, checks.samples(train)
    )
    offline.write(
        model, limit, data_module, str(out), k=k, temperature=temperature, dtype=dtype,
        prov=prov, overwrite=overwrite,
    )  # fmt: skip
    caches = offline.open_caches(str(out))
    bpp = sum(c.meta["total_bytes"] for c in caches.values()) / sum(
        c.meta["num_samples"] * c.meta["seq_length"] for c in caches.values()
    )
    if dist.is_main():
        print(f"teacher cache written to {out}: k={k}, {bpp:.1f} bytes per position", flush=True)
    return {"cache": str(out), "bytes_per_position": bpp, "samples": checks.samples(train)}


def pretrain(
    model: Optional[ModelConfig] = None,
    init_checkpoint: Optional[str] = None,
    data: Optional[DataConfig] = None,
    train: Optional[TrainConfig] = None,
    optim: Optional[OptimConfig] = None,
    parallel: Optional[ParallelConfig] = None,
    output_dir: str = "runs/pretrain",
    export_hf: Optional[str] = None,
    export_nemo: Optional[str] = None,
) -> dict:
    """Train a GPT on its own language-model loss (teachers, same-budget baselines).

    Same loop, run directory, checkpoints and exports as `distill`, without a teacher.
    """
    data, train = data or DataConfig(), train or TrainConfig()
    optim, parallel = optim or OptimConfig(), parallel or ParallelConfig()
    plan = checks.check_pretrain(
        model=model, init_checkpoint=init_checkpoint, data=data, train=train, optim=optim,
        parallel=parallel, world_size=dist.world_size_from_env(), export_hf=export_hf,
        export_nemo=export_nemo,
    )  # fmt: skip
    model = plan.student
    run_path = Path(output_dir)
    dist.initialize(parallel, train.seed)
    write_config(
        run_path,
        {
            "entry_point": "pretrain",
            "model": model.to_dict(),
            "init_checkpoint": init_checkpoint,
            "data": dataclasses.asdict(data),
            "train": dataclasses.asdict(train),
            "optim": dataclasses.asdict(optim),
            "parallel": dataclasses.asdict(parallel),
        },
    )
    gpt = _build(model, parallel, init_checkpoint, "model")
    summary = _fit(gpt, model, data, plan.source, train, optim, parallel, run_path, plan.dp_size)
    return _export(plan, summary, model, parallel)


def init_model(
    model: ModelConfig, output_dir: str, seed: int = 1234, parallel: Optional[ParallelConfig] = None
) -> str:
    """Write a freshly initialised model as a checkpoint (e.g. a fixed random teacher)."""
    parallel = parallel or ParallelConfig()
    parallel.validate(dist.world_size_from_env())
    model.validate(parallel.tensor_parallel, parallel.pipeline_parallel)
    dist.initialize(parallel, seed)
    gpt = _build(model, parallel, None, "model")
    checkpoint.save_model(output_dir, gpt, model, step=0)
    return output_dir


def evaluate(
    teacher: str,
    model_checkpoint: str,
    data: Optional[DataConfig] = None,
    train: Optional[TrainConfig] = None,
    parallel: Optional[ParallelConfig] = None,
    output_file: Optional[str] = None,
) -> dict:
    """Held-out LM loss, perplexity and KL(teacher || model) of the model at `model_checkpoint`.

    The validation samples are those `distill` and `pretrain` validate on for the same `data`
    and `train` (seq_length, global batch, val_batches, seed). The KL is at temperature 1,
    averaged over tokens. Returns {"val_loss", "val_ppl", "kl_to_teacher", "params"} and, with
    `output_file`, writes it there as JSON.
    """
    data, train = data or DataConfig(), train or TrainConfig()
    parallel = parallel or ParallelConfig()
    teacher_cfg, model_cfg, source, dp_size = checks.check_evaluate(
        teacher, model_checkpoint, data, train, parallel, dist.world_size_from_env()
    )
    dist.initialize(parallel, train.seed)
    # ModelOpt is heavy to import: loaded only once a run starts
    from distill_llm.kd import wrapper

    teacher_model = _build(teacher_cfg, parallel, teacher, "teacher")
    model = _build(model_cfg, parallel, model_checkpoint, "model")
    wrapped = wrapper.build_distillation_model(model, teacher_model, KDConfig(temperature=1.0))
    # megatron's index caches: rank 0 writes, the others read, so a shared path
    where = Path(model_checkpoint).resolve().parent / "eval"
    trainer = Trainer(
        model=wrapped,
        student_cfg=model_cfg,
        data=_data_module(data, source, train, dp_size, where),
        train=train,
        optim=OptimConfig(),
        parallel_cfg=parallel,
        run_dir=where,  # nothing is saved: validation only
        teacher=wrapper.OnlineTeacher(wrapped),
    )
    valid = trainer.validate()
    result = {
        "val_loss": valid["val_lm_loss"],
        "val_ppl": valid["val_ppl"],
        "kl_to_teacher": valid["val_kd_loss"],
        "params": model_cfg.num_parameters(),
    }
    if output_file and dist.is_main():
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text(json.dumps(result, indent=2))
    return result


def prune(
    teacher: str,
    output_dir: str,
    target: Union[PruneTarget, int, str],
    data: Optional[DataConfig] = None,
    train: Optional[TrainConfig] = None,
    calibration_batches: int = 16,
    depth_method: str = "lm_loss",
    parallel: Optional[ParallelConfig] = None,
    rescale_norms: bool = True,
    hidden_method: str = "activation",
) -> dict:
    """Cut a smaller model out of `teacher` (Minitron-style structured pruning) and write it to
    `output_dir` as a checkpoint that `distill(student_checkpoint=...)`, `export_hf` and every
    other entry point read, with `prune.json` beside it (what was kept, and why).

    `target`: the pruned shape (a `PruneTarget`, a dict of its fields or a ModelConfig; fields
    left out keep the teacher's) or a parameter budget (an int, or "2M", "4B"), from which the
    largest shape of one width family is chosen and printed (`prune.shape`). Importance comes
    from `calibration_batches` global batches of `train` (its seq_length, batch sizes and seed:
    the first batches `distill` with the same `data` and `train` trains on) of `data`'s
    training split (`prune.importance`): width from activation magnitudes, depth by
    `depth_method` ("lm_loss": the LM loss without the layer; "block_importance": 1 - cosine
    of a layer's input and output; "iterative_lm_loss": layers removed one at a time, each
    time the one whose removal costs the least LM loss given those already gone). The
    highest-scored layers, hidden channels, query groups,
    heads and FFN neurons are kept, in the teacher's order (`prune.plan`, `prune.slicing`).
    With fewer hidden channels and `rescale_norms` (our addition to Minitron), each kept
    RMSNorm's weight is multiplied by the calibration ratio of its input's root mean square over
    the kept channels to that over all (`prune.plan.norm_scales`), so the pruned model's
    normalised activations keep the teacher's scale (quickstart: 0.09 nats lower start loss).
    `hidden_method`: how hidden channels are chosen. "activation" (Minitron): the teacher's
    channels with the highest activation scores. "pca" (SliceGPT's rotation, our addition;
    RMSNorm teachers with an untied output layer): the residual stream is first rotated, an
    exact change of basis, so that its first channels are the principal components of the
    stream as the kept layers read it, and those are kept (`prune.rotation`; the rotation is
    written as rotation.pt). On the quickstart's teacher (hidden 256 -> 64) it starts the
    pruned student at 4.86 instead of 6.12.

    Tensor and data parallel as in `distill` (the importance is gathered over TP ranks and
    summed over DP ranks: the result is the TP=1 result); pipeline parallel and mixture-of-
    experts teachers are refused. Nothing is written unless the whole model is.
    Returns {"checkpoint", "params", "teacher_params", "student_model", "calibration_loss"}.
    """
    data, train = data or DataConfig(), train or TrainConfig()
    parallel = parallel or ParallelConfig()
    teacher_cfg, student_cfg, data, source, dp_size = checks.check_prune(
        teacher, output_dir, target=target, data=data, train=train, parallel=parallel,
        calibration_batches=calibration_batches, depth_method=depth_method,
        world_size=dist.world_size_from_env(), rescale_norms=rescale_norms,
        hidden_method=hidden_method,
    )  # fmt: skip
    out = Path(output_dir)
    scratch = out.with_name(f".{out.name}.calibration")  # megatron's data index caches
    dist.initialize(parallel, train.seed)
    if dist.is_main():
        print(shape.announce(str(teacher), teacher_cfg, target, student_cfg), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)  # a crashed run's leftovers
    dist.barrier()
    try:
        model = paths.load_on_layout(teacher, teacher_cfg, parallel, role="teacher")
        calibration = dataclasses.replace(train, steps=calibration_batches)
        data_module = _data_module(data, source, calibration, dp_size, scratch)
        batches = list(
            itertools.islice(
                data_module.train_batches(0),
                calibration_batches * data_module.plan.num_microbatches,
            )
        )
        drop = teacher_cfg.num_layers - student_cfg.num_layers
        scores = importance.collect(model, teacher_cfg, batches, depth_method, drop)
        axes = None
        if hidden_method == "pca" and student_cfg.hidden_size < teacher_cfg.hidden_size:
            scores, axes = rotation.rotate_teacher(
                model, teacher_cfg, student_cfg, batches, scores, depth_method
            )
        kept = [prune_plan.choose(scores, teacher_cfg, student_cfg, depth_method, rescale_norms)]
        if torch.distributed.get_world_size() > 1:  # one decision, whatever the float noise
            torch.distributed.broadcast_object_list(kept, src=0)
        student = _build(student_cfg, parallel, None, "student")
        slicing.fill(student, model, kept[0], teacher_cfg)
        content = output.record(
            teacher=teacher, teacher_cfg=teacher_cfg, target=target, student_cfg=student_cfg,
            depth_method=depth_method, scores=scores, plan=kept[0], hidden_method=hidden_method,
            rotated=axes is not None,
            calibration={"batches": calibration_batches, "seq_length": train.seq_length,
                         "samples": calibration_batches * train.global_batch_size,
                         "seed": train.seed},
        )  # fmt: skip
        output.write(out, student, student_cfg, content, output.tokenizer_metadata(teacher, data),
                     rotation=axes)  # fmt: skip
    finally:
        if dist.is_main():
            shutil.rmtree(scratch, ignore_errors=True)
    if dist.is_main():
        print(f"pruned model written to {out} (calibration loss of the teacher "
              f"{scores.calibration_loss:.4f})", flush=True)  # fmt: skip
    return {
        "checkpoint": str(out),
        "params": student_cfg.num_parameters(),
        "teacher_params": teacher_cfg.num_parameters(),
        "student_model": student_cfg.to_dict(),
        "calibration_loss": scores.calibration_loss,
    }
