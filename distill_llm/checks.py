"""Every up-front refusal: the checks a user can fail, made before any process group, model or
file exists. The entry points (`api`) and the CLI's preflight (`cli.preflight`, before a job is
submitted) call the same functions, so the two can never disagree.

    dp = checks.check_common(train, optim, parallel, world_size)
    plan = checks.check_distill(teacher=..., student=..., ..., world_size=ws)   # api and CLI
    checks.check_pretrain(model=..., init_checkpoint=..., ..., world_size=ws)
    teacher_cfg, student, data, source, dp = checks.check_prune(teacher, out, target=..., ...)

`local_files=False` (the CLI submitting to another machine) skips the checks whose inputs are
paths that do not exist here; everything else is checked the same way.
"""

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from distill_llm.data.datasets import BatchPlan, DataConfig, DataSource, parse_blend
from distill_llm.data.tokenizer import load_tokenizer, vocabulary_difference
from distill_llm.engine.model import ModelConfig
from distill_llm.engine.parallel import ParallelConfig
from distill_llm.engine.training import OptimConfig, TrainConfig
from distill_llm.errors import ConfigError
from distill_llm.formats import paths
from distill_llm.formats.hf import config as hf_config
from distill_llm.formats.hf.io import export_settings
from distill_llm.formats.nemo import checkpoint as nemo_checkpoint
from distill_llm.formats.nemo import config as nemo_config
from distill_llm.formats.nemo.io import check_output as check_nemo_output
from distill_llm.kd import offline, teacher_cache
from distill_llm.kd.config import KDConfig
from distill_llm.prune import shape
from distill_llm.prune.importance import DEPTH_METHODS, HIDDEN_METHODS

_LAST_STAGE_MODULES = ("decoder.final_layernorm", "output_layer")


def check_common(train: TrainConfig, optim: OptimConfig, parallel: ParallelConfig, world_size):
    """The settings every entry point shares; returns the data-parallel size."""
    train.validate()
    optim.validate()
    dp_size = parallel.validate(world_size)
    BatchPlan(train.micro_batch_size, train.global_batch_size, dp_size)  # raises if uneven
    return dp_size


def check_seq_length(model: ModelConfig, seq_length: int, role: str) -> None:
    """Refuse a sequence length beyond what the model's positions cover."""
    if seq_length > model.max_seq_length:
        raise ConfigError(
            f"seq_length {seq_length} is beyond the {role}'s max_seq_length "
            f"{model.max_seq_length}; lower train.seq_length"
        )


def check_model(model: ModelConfig, parallel: ParallelConfig, seq_length: int, role: str) -> None:
    """One model's architecture against the parallel layout and the sequence length."""
    model.validate(parallel.tensor_parallel, parallel.pipeline_parallel, role=role,
                   expert_parallel=parallel.expert_parallel)  # fmt: skip
    check_seq_length(model, seq_length, role)


def check_expert_parallel(models: list, parallel: ParallelConfig) -> None:
    """Refuse expert_parallel > 1 when no model of the run has experts to split."""
    if parallel.expert_parallel > 1 and not any(m is not None and m.is_moe for m in models):
        raise ConfigError(
            f"expert_parallel {parallel.expert_parallel} needs a mixture-of-experts model "
            "(num_experts); use data parallel for dense models"
        )


def check_compatible(
    student: ModelConfig, teacher: ModelConfig, parallel: ParallelConfig, seq_length: int
) -> None:
    """Refuse a teacher/student pair that cannot be distilled on this layout. Vocabulary sizes
    may differ (the KD loss runs over the ids both have); different tokenizers are refused by
    `check_same_tokenizer`, token ids beyond either vocabulary by DataConfig.resolve."""
    check_model(student, parallel, seq_length, "student")
    check_model(teacher, parallel, seq_length, "teacher")


def check_pipeline_pairs(
    kd: KDConfig, student: ModelConfig, teacher: ModelConfig, pipeline_parallel: int
) -> None:
    """Under pipeline parallel the KD losses are computed on the last stage, so intermediate
    pairs can only name modules that live there (ModelOpt's plugin has no cross-stage pairs)."""
    if pipeline_parallel == 1:
        return
    for pair in kd.intermediate_pairs:
        for name, cfg, role in ((pair[0], student, "student"), (pair[1], teacher, "teacher")):
            first = cfg.num_layers - cfg.num_layers // pipeline_parallel
            layer = re.match(r"decoder\.layers\.(\d+)(\.|$)", name)
            on_last = name.startswith(_LAST_STAGE_MODULES) or (
                layer is not None and int(layer.group(1)) >= first
            )
            if not on_last:
                raise ConfigError(
                    f"kd.intermediate_pairs: the {role}'s {name!r} is not on the last pipeline "
                    f"stage, where KD losses are computed with pipeline_parallel="
                    f"{pipeline_parallel}; pair modules from decoder.layers.{first}-"
                    f"{cfg.num_layers - 1} or decoder.final_layernorm, or lower pipeline_parallel"
                )


def check_same_tokenizer(named: dict) -> None:
    """Refuse models/data that come with different tokenizers ({role: model or tokenizer path}).

    Logit distillation compares probabilities id by id, which only means something when both
    models give each id the same token."""
    found = []
    for role, path in named.items():
        where = path if role == "data.tokenizer" else paths.tokenizer_dir_of(path)
        if where:
            found.append((role, where, load_tokenizer(where)))
    for role, where, tok in found[1:]:
        first_role, first_where, first = found[0]
        diff = vocabulary_difference(first, tok)
        if diff is not None:
            raise ConfigError(
                f"the {first_role}'s tokenizer ({first_where}) and the {role}'s ({where}) differ "
                f"({diff}); cross-tokenizer distillation is not supported: use a student and "
                "data with the teacher's tokenizer"
            )


def _visible(path, local_files: bool) -> bool:
    """Whether a path-dependent check runs: always for the API (a missing path is then
    refused by it), only for paths that exist here for the CLI submitting elsewhere."""
    return bool(path) and (local_files or Path(path).exists())


def check_export(target, model_cfg, sources, data: DataConfig, protected, pp: int):
    """Checks for `export_hf=` made before training; returns what the export needs afterwards
    ({dir, family, dtype, tokenizer}), or None without an export."""
    if not target:
        return None
    if pp > 1:
        raise ConfigError(
            "export_hf= needs pipeline_parallel=1 (the export gathers tensor-parallel shards "
            "only); drop it and run `nemo distill_llm export_hf` on the final checkpoint"
        )
    for p in [s for s in protected + sources if s]:
        if Path(target).resolve() == Path(p).resolve():
            raise ConfigError(
                f"export_hf {target!r} is an input of this run; choose a new directory"
            )
    tokenizer = data.tokenizer if data.tokenizer and Path(data.tokenizer).is_dir() else None
    family, dtype, tokenizer = export_settings(sources, tokenizer)
    hf_config.check_exportable(model_cfg, hf_config.family_for(model_cfg, family))
    return {"dir": target, "family": family, "dtype": dtype, "tokenizer": tokenizer}


def check_export_nemo(target, model_cfg, sources, data: DataConfig, protected):
    """Checks for `export_nemo=` made before training; returns {path, format, tokenizer} for
    the export afterwards, or None without one. The tokenizer written into the NeMo file is
    data.tokenizer, else the one the first of `sources` (student, teacher) carries."""
    if not target:
        return None
    fmt = check_nemo_output(target, None, [s for s in protected + sources if s])
    if fmt == "nemo1":
        nemo_config.check_nemo1(model_cfg)
    tokenizer = data.tokenizer
    for src in sources:
        if tokenizer is None and src:
            tokenizer = paths.tokenizer_dir_of(src)
    return {"path": str(target), "format": fmt, "tokenizer": tokenizer}


def default_data_tokenizer(data: DataConfig, teacher: Optional[str]) -> DataConfig:
    """`data` with its tokenizer defaulting to the one a NeMo teacher carries (NeMo users'
    data is tokenized with the model's own tokenizer and has no .meta.json)."""
    if data.tokenizer or data.mock or not teacher or not nemo_checkpoint.is_nemo(teacher):
        return data
    found = paths.tokenizer_dir_of(teacher)
    return dataclasses.replace(data, tokenizer=found) if found else data


@dataclass
class DistillPlan:
    """What `check_distill` resolved: the architectures, the checked data blend, the data-
    parallel size, the teacher cache (opened) and the export plan."""

    teacher_cfg: Optional[ModelConfig]
    student: Optional[ModelConfig]
    dp_size: int
    source: Optional[DataSource] = None
    caches: Optional[dict] = None
    export: Optional[dict] = None
    export_nemo: Optional[dict] = None


def check_distill(
    *,
    teacher: Optional[str],
    student: Optional[ModelConfig],
    student_checkpoint: Optional[str],
    kd: KDConfig,
    data: DataConfig,
    train: TrainConfig,
    optim: OptimConfig,
    parallel: ParallelConfig,
    world_size: int,
    teacher_cache: Optional[str] = None,
    export_hf: Optional[str] = None,
    output_dir: Optional[str] = None,
    local_files: bool = True,
    export_nemo: Optional[str] = None,
) -> DistillPlan:
    """Every refusal `distill` makes before it starts, in the order a user thinks of them.
    The student architecture defaults as `distill` documents (the student checkpoint's, else
    half the teacher's depth); with `local_files=False` checks on paths absent here are
    skipped and the returned plan may lack what they would have resolved."""
    dp_size = check_common(train, optim, parallel, world_size)
    kd.validate()
    pp = parallel.pipeline_parallel
    caches, teacher_cfg = None, None
    if teacher_cache:
        if output_dir and Path(output_dir).resolve() == Path(teacher_cache).resolve():
            raise ConfigError("output_dir is the teacher_cache; choose another run directory")
        if kd.intermediate_pairs:
            raise ConfigError(
                "kd.intermediate_pairs need the teacher's hidden states, which a teacher cache "
                "does not hold; drop them or distil from the teacher checkpoint"
            )
        if _visible(teacher_cache, local_files):
            caches = offline.open_caches(teacher_cache)
            prov = caches["train"].meta.get("provenance", {})
            teacher_cfg = ModelConfig.from_dict(prov["teacher_model"])
    elif not teacher:
        raise ConfigError(
            "distill needs teacher= (a checkpoint or HF directory) or teacher_cache= (a "
            "directory made by cache_teacher)"
        )
    if teacher_cfg is None and _visible(teacher, local_files):
        teacher_cfg = paths.model_config_of(teacher)
    elif teacher and _visible(teacher, local_files):
        paths.model_config_of(teacher)  # exists and is readable
    if _visible(student_checkpoint, local_files):
        stored = paths.model_config_of(student_checkpoint)
        student = student if student is not None else stored
    if student is None and teacher_cfg is not None and not student_checkpoint:
        student = default_student(teacher_cfg)
    if student is not None:
        check_model(student, parallel, train.seq_length, "student")
    plan = DistillPlan(teacher_cfg, student, dp_size, caches=caches)
    if student is None or teacher_cfg is None:
        return plan  # the rest needs both architectures (inputs on another machine)
    plan.export = check_export(
        export_hf, student, [student_checkpoint, teacher], data, [teacher, teacher_cache], pp
    )
    if _visible(teacher, local_files):
        data = default_data_tokenizer(data, teacher)
    plan.export_nemo = check_export_nemo(
        export_nemo, student, [student_checkpoint, teacher], data,
        [teacher, teacher_cache, output_dir],
    )  # fmt: skip
    check_compatible(student, teacher_cfg, parallel, train.seq_length)
    check_expert_parallel([student, teacher_cfg], parallel)
    check_pipeline_pairs(kd, student, teacher_cfg, pp)
    check_same_tokenizer(
        {"teacher": teacher, "student": student_checkpoint, "data.tokenizer": data.tokenizer}
    )
    if local_files or all(Path(p).exists() for p in _data_paths(data)):
        vocab = {"teacher": teacher_cfg.vocab_size, "student": student.vocab_size}
        plan.source = data.resolve(vocab, train.seq_length)
        if caches is not None:
            check_cache(caches, teacher, kd, student, data, train, plan.source)
    return plan


def check_pretrain(
    *,
    model: Optional[ModelConfig],
    init_checkpoint: Optional[str],
    data: DataConfig,
    train: TrainConfig,
    optim: OptimConfig,
    parallel: ParallelConfig,
    world_size: int,
    export_hf: Optional[str] = None,
    local_files: bool = True,
    export_nemo: Optional[str] = None,
) -> DistillPlan:
    """Every refusal `pretrain` makes before it starts (the plan's `student` is the model)."""
    dp_size = check_common(train, optim, parallel, world_size)
    if _visible(init_checkpoint, local_files):
        stored = paths.model_config_of(init_checkpoint)
        model = model if model is not None else stored
    elif model is None and not init_checkpoint:
        model = ModelConfig()
    plan = DistillPlan(None, model, dp_size)
    if model is None:
        return plan
    plan.export = check_export(
        export_hf, model, [init_checkpoint], data, [], parallel.pipeline_parallel
    )
    plan.export_nemo = check_export_nemo(export_nemo, model, [init_checkpoint], data, [])
    check_model(model, parallel, train.seq_length, "model")
    check_expert_parallel([model], parallel)
    if local_files or all(Path(p).exists() for p in _data_paths(data)):
        plan.source = data.resolve({"model": model.vocab_size}, train.seq_length)
    return plan


def samples(train: TrainConfig) -> dict:
    """Samples a run trains and validates on: what a teacher cache must cover."""
    return {
        "train": train.steps * train.global_batch_size,
        "valid": train.val_batches * train.global_batch_size,
    }


def check_cache(caches: dict, teacher, kd: KDConfig, student: ModelConfig, data, train, source):
    """Check a teacher cache against this run: all but the sample stream, which the trainer
    checks once the datasets exist."""
    prov = caches["train"].meta.get("provenance", {})
    cache_vocab = caches["train"].meta["vocab_size"]
    if student.vocab_size < cache_vocab:
        raise ConfigError(
            f"teacher cache ids go up to {cache_vocab - 1} but the student's vocabulary is "
            f"{student.vocab_size}; make the cache with vocab_limit={student.vocab_size}"
        )
    now = offline.provenance(
        teacher or prov.get("teacher", ""), ModelConfig.from_dict(prov["teacher_model"]), None,
        source, data, samples(train), teacher_given=bool(teacher),
    )  # fmt: skip
    for split in offline.SPLITS:
        caches[split].check(offline.expected(now, teacher, kd, train.seq_length))


def check_cache_teacher(
    teacher: str,
    output_dir: str,
    *,
    k: int,
    temperature: float,
    data: DataConfig,
    train: TrainConfig,
    parallel: ParallelConfig,
    dtype: str,
    vocab_limit: Optional[int],
    overwrite: bool,
    world_size: int,
):
    """Every refusal `cache_teacher` makes before it starts; returns (teacher architecture,
    vocabulary limit, checked data blend, data-parallel size)."""
    dp_size = check_common(train, OptimConfig(), parallel, world_size)
    if parallel.pipeline_parallel > 1:
        raise ConfigError(
            "cache_teacher runs with pipeline_parallel=1; use tensor or data parallel"
        )
    if dtype not in teacher_cache.DTYPES:
        raise ConfigError(
            f"dtype {dtype!r} is not supported; use one of {', '.join(teacher_cache.DTYPES)}"
        )
    teacher_cfg = paths.model_config_of(teacher)
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
    if Path(output_dir).exists() and not overwrite:
        raise ConfigError(f"{output_dir} exists; choose a new directory or pass overwrite=True")
    cache_layout = ParallelConfig(
        tensor_parallel=parallel.tensor_parallel, expert_parallel=parallel.expert_parallel
    )
    check_model(teacher_cfg, cache_layout, train.seq_length, "teacher")
    check_expert_parallel([teacher_cfg], parallel)
    source = data.resolve({"teacher": teacher_cfg.vocab_size}, train.seq_length)
    return teacher_cfg, limit, source, dp_size


def check_evaluate(teacher, model_checkpoint, data, train, parallel, world_size):
    """Every refusal `evaluate` makes before it starts; returns (teacher architecture, model
    architecture, checked data blend, data-parallel size)."""
    dp_size = check_common(train, OptimConfig(), parallel, world_size)
    teacher_cfg = paths.model_config_of(teacher)
    model_cfg = paths.model_config_of(model_checkpoint)
    check_compatible(model_cfg, teacher_cfg, parallel, train.seq_length)
    vocab = {"teacher": teacher_cfg.vocab_size, "model": model_cfg.vocab_size}
    return teacher_cfg, model_cfg, data.resolve(vocab, train.seq_length), dp_size


def check_prune(
    teacher: str,
    output_dir: str,
    *,
    target: shape.Target,
    data: DataConfig,
    train: TrainConfig,
    parallel: ParallelConfig,
    calibration_batches: int,
    depth_method: str,
    world_size: int,
    local_files: bool = True,
    rescale_norms: bool = True,
    hidden_method: str = "activation",
):
    """Every refusal `prune` makes before it starts; returns (teacher architecture, pruned
    architecture, data config with its tokenizer defaulted, checked data blend, data-parallel
    size). With `local_files=False` the teacher and data may be absent here: the architectures
    and blend are then None."""
    dp_size = check_common(train, OptimConfig(), parallel, world_size)
    if parallel.pipeline_parallel > 1:
        raise ConfigError("prune runs with pipeline_parallel=1; use tensor or data parallel")
    if depth_method not in DEPTH_METHODS:
        raise ConfigError(
            f"depth_method {depth_method!r} is unknown; choose one of {', '.join(DEPTH_METHODS)}"
        )
    if hidden_method not in HIDDEN_METHODS:
        raise ConfigError(
            f"hidden_method {hidden_method!r} is unknown; choose one of {', '.join(HIDDEN_METHODS)}"
        )
    if isinstance(calibration_batches, bool) or not (
        isinstance(calibration_batches, int) and calibration_batches >= 1
    ):
        raise ConfigError(f"calibration_batches must be at least 1, got {calibration_batches!r}")
    if not isinstance(rescale_norms, bool):
        raise ConfigError(f"rescale_norms must be True or False, got {rescale_norms!r}")
    if output_dir and Path(output_dir).exists():
        raise ConfigError(f"output_dir {output_dir} exists; choose a new directory")
    if not _visible(teacher, local_files):
        shape.parse_budget(target)  # a malformed budget string is wrong anywhere
        return None, None, data, None, dp_size
    teacher_cfg = paths.model_config_of(teacher)
    if teacher_cfg.is_moe:
        raise ConfigError(
            "pruning a mixture-of-experts teacher is not supported (experts are not ranked); "
            "give a dense teacher"
        )
    check_model(teacher_cfg, parallel, train.seq_length, "teacher")
    check_expert_parallel([teacher_cfg], parallel)
    if hidden_method == "pca" and teacher_cfg.normalization != "RMSNorm":
        raise ConfigError(
            f"hidden_method='pca' needs an RMSNorm teacher (this one has "
            f"{teacher_cfg.normalization}); use hidden_method='activation'"
        )
    if hidden_method == "pca" and teacher_cfg.tie_embeddings:
        raise ConfigError(
            "hidden_method='pca' needs an untied output layer (the final norm's weight is "
            "folded into it) and this teacher ties it to the embedding; use "
            "hidden_method='activation'"
        )
    student = shape.resolve(teacher_cfg, target, parallel.tensor_parallel)
    data = default_data_tokenizer(data, teacher)
    check_same_tokenizer({"teacher": teacher, "data.tokenizer": data.tokenizer})
    source = None
    if local_files or all(Path(p).exists() for p in _data_paths(data)):
        source = data.resolve({"teacher": teacher_cfg.vocab_size}, train.seq_length)
    return teacher_cfg, student, data, source, dp_size


def _data_paths(data: DataConfig) -> list:
    """The files a data setting names (tokenizer and .bin/.idx prefixes' index files)."""
    out = [data.tokenizer] if data.tokenizer else []
    if not data.mock:
        prefixes, _ = parse_blend(data.paths)
        out += [f"{p}.idx" for p in prefixes]
    return out


def default_student(teacher: ModelConfig) -> ModelConfig:
    """The student used when none is given: the teacher's architecture at half its depth."""
    return dataclasses.replace(teacher, num_layers=max(1, teacher.num_layers // 2))
