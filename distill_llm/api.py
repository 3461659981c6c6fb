"""Entry points: `distill` (student learns from a frozen teacher) and `pretrain` (same loop, no
teacher). Both take plain dataclass configs, so Fiddle and NeMo-Run can build and launch them.

Launch (one process per tensor-parallel rank, times data-parallel replicas):
    nemo distill_llm distill --factory tiny run.executor=local run.executor.ntasks_per_node=2
(see distill_llm/cli.py and the recipes), or call them from Python inside any script started
with `torchrun --nproc_per_node=N`.
"""

import dataclasses
from pathlib import Path
from typing import Optional

from distill_llm import checkpoint, offline
from distill_llm import kd as kd_lib
from distill_llm import parallel as dist
from distill_llm.data import BatchPlan, DataConfig, DataModule
from distill_llm.errors import ConfigError
from distill_llm.kd import KDConfig
from distill_llm.model import ModelConfig, build_gpt
from distill_llm.parallel import ParallelConfig
from distill_llm.run_dir import write_config
from distill_llm.training import OptimConfig, TrainConfig, Trainer


def default_student(teacher: ModelConfig) -> ModelConfig:
    """The student used when none is given: the teacher's architecture at half its depth."""
    return dataclasses.replace(teacher, num_layers=max(1, teacher.num_layers // 2))


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


def _fit(
    model, model_cfg, data, source, train, optim, parallel, run_path, dp_size, cached=None
) -> dict:
    """Train `model` (a GPT, or a GPT wrapped with its teacher, or a GPT with a `cached`
    teacher: (caches, CachedTeacher)) to the end of `train`."""
    data_module = _data_module(data, source, train, dp_size, run_path)
    if cached is not None:
        cached[0].check({"data_stream": data_module.stream_id})
    trainer = Trainer(
        model=model,
        student_cfg=model_cfg,
        data=data_module,
        train=train,
        optim=optim,
        parallel_cfg=parallel,
        run_dir=run_path,
        is_distillation=hasattr(model, "teacher_model"),
        cached_teacher=None if cached is None else cached[1],
    )
    return trainer.fit()


def _export_plan(target, model_cfg, sources, data, protected, pp: int) -> Optional[dict]:
    """Checks for `export_hf` made before training; what `_export` needs afterwards."""
    if not target:
        return None
    if pp > 1:
        raise ConfigError(
            "export_hf= needs pipeline_parallel=1 (the export gathers tensor-parallel shards "
            "only); drop it and run `nemo distill_llm export_hf` on the final checkpoint"
        )
    from distill_llm import hf as hf_lib

    for p in [s for s in protected + sources if s]:
        if Path(target).resolve() == Path(p).resolve():
            raise ConfigError(
                f"export_hf {target!r} is an input of this run; choose a new directory"
            )
    tokenizer = data.tokenizer if data.tokenizer and Path(data.tokenizer).is_dir() else None
    family, dtype, tokenizer = hf_lib.export_settings(sources, tokenizer)
    hf_lib.check_exportable(model_cfg, hf_lib.family_for(model_cfg, family))
    return {"dir": target, "family": family, "dtype": dtype, "tokenizer": tokenizer}


def _export(plan: Optional[dict], summary: dict, model_cfg, parallel) -> dict:
    """Write the final model (reloaded from `final/`, TP shards gathered) as an HF directory."""
    if plan is None:
        return summary
    from distill_llm import hf as hf_lib

    hf_lib.export_checkpoint(summary["final"], model_cfg, plan["dir"], parallel,
                             family=plan["family"], dtype=plan["dtype"],
                             tokenizer=plan["tokenizer"])  # fmt: skip
    if dist.is_main():
        print(f"exported the final model to {plan['dir']} (Hugging Face)", flush=True)
    return {**summary, "export_hf": plan["dir"]}


def _check_common(train, optim, parallel_cfg) -> int:
    """Check the settings every entry point shares; returns the data-parallel size."""
    train.validate()
    optim.validate()
    dp_size = parallel_cfg.validate(dist.world_size_from_env())
    BatchPlan(train.micro_batch_size, train.global_batch_size, dp_size)  # raises if uneven
    return dp_size


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
    dp_size = _check_common(train, optim, parallel)
    kd.validate()
    caches = None
    if teacher_cache:
        if Path(output_dir).resolve() == Path(teacher_cache).resolve():
            raise ConfigError("output_dir is the teacher_cache; choose another run directory")
        caches = offline.open_caches(teacher_cache)
        prov = caches["train"].meta.get("provenance", {})
        teacher_cfg = ModelConfig.from_dict(prov["teacher_model"])
        if kd.intermediate_pairs:
            raise ConfigError(
                "kd.intermediate_pairs need the teacher's hidden states, which a teacher cache "
                "does not hold; drop them or distil from the teacher checkpoint"
            )
    elif teacher:
        teacher_cfg = checkpoint.model_config_of(teacher)
    else:
        raise ConfigError(
            "distill needs teacher= (a checkpoint or HF directory) or teacher_cache= (a "
            "directory made by cache_teacher)"
        )
    if student is None:
        student = (
            checkpoint.model_config_of(student_checkpoint)
            if student_checkpoint
            else default_student(teacher_cfg)
        )
    elif student_checkpoint:
        checkpoint.model_config_of(student_checkpoint)  # exists and is readable
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    export = _export_plan(
        export_hf, student, [student_checkpoint, teacher], data, [teacher, teacher_cache], pp
    )
    kd_lib.check_compatible(
        student, teacher_cfg, seq_length=train.seq_length, tensor_parallel=tp, pipeline_parallel=pp
    )
    kd_lib.check_pipeline_pairs(kd, student, teacher_cfg, pp)
    kd_lib.check_same_tokenizer(
        {"teacher": teacher, "student": student_checkpoint, "data.tokenizer": data.tokenizer}
    )
    vocab = {"teacher": teacher_cfg.vocab_size, "student": student.vocab_size}
    source = data.resolve(vocab, train.seq_length)
    cached = None
    if caches is not None:
        cached = _cached_teacher(caches, teacher, kd, student, data, train, source)

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
    dtype = parallel.params_dtype
    # The student is built first, so a fresh student starts from exactly the weights `pretrain`
    # gives the same architecture and seed (a fair from-scratch baseline).
    student_model = build_gpt(student, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=dtype)
    if student_checkpoint:
        checkpoint.load_model(student_checkpoint, student_model, student, role="student")
    if cached is not None:
        summary = _fit(student_model, student, data, source, train, optim, parallel, run_path,
                       dp_size, cached=cached)  # fmt: skip
        return _export(export, summary, student, parallel)
    teacher_model = build_gpt(
        teacher_cfg, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=dtype
    )
    checkpoint.load_model(teacher, teacher_model, teacher_cfg, role="teacher")
    model = kd_lib.build_distillation_model(student_model, teacher_model, kd)
    summary = _fit(model, student, data, source, train, optim, parallel, run_path, dp_size)
    return _export(export, summary, student, parallel)


def _cached_teacher(caches, teacher, kd, student, data, train, source):
    """Check a teacher cache against this run (all but the sample stream, checked once the
    datasets exist) and build the loss that reads it."""
    prov = caches["train"].meta.get("provenance", {})
    cache_vocab = caches["train"].meta["vocab_size"]
    if student.vocab_size < cache_vocab:
        raise ConfigError(
            f"teacher cache ids go up to {cache_vocab - 1} but the student's vocabulary is "
            f"{student.vocab_size}; make the cache with vocab_limit={student.vocab_size}"
        )
    if teacher:
        checkpoint.model_config_of(teacher)  # exists and is readable
    now = offline.provenance(
        teacher or prov.get("teacher", ""), ModelConfig.from_dict(prov["teacher_model"]), None,
        source, data, _samples(train), teacher_given=bool(teacher),
    )  # fmt: skip
    for split in offline.SPLITS:
        caches[split].check(offline.expected(now, teacher, kd, train.seq_length))
    return caches["train"], offline.CachedTeacher(caches, kd, cache_vocab)


def _samples(train: TrainConfig) -> dict:
    return {
        "train": train.steps * train.global_batch_size,
        "valid": train.val_batches * train.global_batch_size,
    }


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
    import shutil

    from distill_llm import teacher_cache as tc

    data, train = data or DataConfig(), train or TrainConfig()
    parallel = parallel or ParallelConfig()
    dp_size = _check_common(train, OptimConfig(), parallel)
    if parallel.pipeline_parallel > 1:
        raise ConfigError(
            "cache_teacher runs with pipeline_parallel=1; use tensor or data parallel"
        )
    if dtype not in tc.DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(tc.DTYPES)}")
    teacher_cfg = checkpoint.model_config_of(teacher)
    limit = vocab_limit or teacher_cfg.vocab_size
    if not 1 <= limit <= teacher_cfg.vocab_size:
        raise ConfigError(
            f"vocab_limit must be between 1 and the teacher's vocabulary {teacher_cfg.vocab_size}"
            f", got {vocab_limit}"
        )
    if not 1 <= k <= limit:
        raise ConfigError(f"k must be between 1 and the vocabulary size {limit}, got {k}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{output_dir} exists; choose a new directory or pass overwrite=True")
    tp = parallel.tensor_parallel
    teacher_cfg.validate(tp, 1, role="teacher")
    kd_lib.check_seq_length(teacher_cfg, train.seq_length, "teacher")
    source = data.resolve({"teacher": teacher_cfg.vocab_size}, train.seq_length)

    dist.initialize(parallel, train.seed)
    staging = out.with_name(f".{out.name}.tmp")
    if dist.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)  # a crashed run's leftovers
    dist.barrier()
    model = build_gpt(teacher_cfg, tensor_parallel=tp, params_dtype=parallel.params_dtype)
    checkpoint.load_model(teacher, model, teacher_cfg, role="teacher")
    data_module = _data_module(data, source, train, dp_size, staging)
    prov = offline.provenance(teacher, teacher_cfg, data_module, source, data, _samples(train))
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
    return {"cache": str(out), "bytes_per_position": bpp, "samples": _samples(train)}


def pretrain(
    model: Optional[ModelConfig] = None,
    init_checkpoint: Optional[str] = None,
    data: Optional[DataConfig] = None,
    train: Optional[TrainConfig] = None,
    optim: Optional[OptimConfig] = None,
    parallel: Optional[ParallelConfig] = None,
    output_dir: str = "runs/pretrain",
    export_hf: Optional[str] = None,
) -> dict:
    """Train a GPT on its own language-model loss (teachers, same-budget baselines).

    Same loop, run directory and checkpoints as `distill`, without a teacher.
    """
    data, train = data or DataConfig(), train or TrainConfig()
    optim, parallel = optim or OptimConfig(), parallel or ParallelConfig()
    dp_size = _check_common(train, optim, parallel)
    if model is None:
        model = checkpoint.model_config_of(init_checkpoint) if init_checkpoint else ModelConfig()
    elif init_checkpoint:
        checkpoint.model_config_of(init_checkpoint)  # exists and is readable
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    export = _export_plan(export_hf, model, [init_checkpoint], data, [], pp)
    model.validate(tp, pp, role="model")
    kd_lib.check_seq_length(model, train.seq_length, "model")
    source = data.resolve({"model": model.vocab_size}, train.seq_length)

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
    gpt = build_gpt(
        model, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=parallel.params_dtype
    )
    if init_checkpoint:
        checkpoint.load_model(init_checkpoint, gpt, model, role="model")
    summary = _fit(gpt, model, data, source, train, optim, parallel, run_path, dp_size)
    return _export(export, summary, model, parallel)


def init_model(
    model: ModelConfig, output_dir: str, seed: int = 1234, parallel: Optional[ParallelConfig] = None
) -> str:
    """Write a freshly initialised model as a checkpoint (e.g. a fixed random teacher)."""
    parallel = parallel or ParallelConfig()
    parallel.validate(dist.world_size_from_env())
    model.validate(parallel.tensor_parallel, parallel.pipeline_parallel)
    dist.initialize(parallel, seed)
    gpt = build_gpt(
        model,
        tensor_parallel=parallel.tensor_parallel,
        pipeline_parallel=parallel.pipeline_parallel,
        params_dtype=parallel.params_dtype,
    )
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
    import json

    data, train = data or DataConfig(), train or TrainConfig()
    parallel = parallel or ParallelConfig()
    dp_size = _check_common(train, OptimConfig(), parallel)
    teacher_cfg = checkpoint.model_config_of(teacher)
    model_cfg = checkpoint.model_config_of(model_checkpoint)
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    kd_lib.check_compatible(
        model_cfg,
        teacher_cfg,
        seq_length=train.seq_length,
        tensor_parallel=tp,
        pipeline_parallel=pp,
    )
    vocab = {"teacher": teacher_cfg.vocab_size, "model": model_cfg.vocab_size}
    source = data.resolve(vocab, train.seq_length)
    dist.initialize(parallel, train.seed)
    dtype = parallel.params_dtype
    teacher_model = build_gpt(
        teacher_cfg, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=dtype
    )
    checkpoint.load_model(teacher, teacher_model, teacher_cfg, role="teacher")
    model = build_gpt(model_cfg, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=dtype)
    checkpoint.load_model(model_checkpoint, model, model_cfg, role="model")
    wrapped = kd_lib.build_distillation_model(model, teacher_model, KDConfig(temperature=1.0))
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
        is_distillation=True,
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
