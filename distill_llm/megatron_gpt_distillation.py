"""NeMo 1's `examples/nlp/language_modeling/megatron_gpt_distillation.py` command line, run by
`distill_llm.distill`: the same Hydra-style `key=value` overrides, typed as in NeMo's docs.

    # 1 node, tensor parallel over TP GPUs (the command from NeMo's distillation docs)
    torchrun --nproc_per_node=$TP -m distill_llm.megatron_gpt_distillation \
        model.restore_from_path=path/to/student.nemo \
        model.kd_teacher_restore_from_path=path/to/teacher.nemo \
        model.tensor_model_parallel_size=$TP model.tokenizer.model=path/to/tokenizer.model \
        model.data.data_prefix=[1.0,path/to/tokenized/data] model.nemo_path=final_checkpoint.nemo \
        trainer.precision=bf16 trainer.devices=$TP
    # 2 nodes: the same on each node, plus
    #   torchrun --nnodes=2 --node_rank=$NODE --master_addr=$HEAD ... trainer.num_nodes=2
    python -m distill_llm.megatron_gpt_distillation --help      # every supported key

Unlike NeMo's Hydra config, a key this command does not know is refused (one line listing the
supported keys), and the keys in `IGNORED_KEYS` are accepted with a note. Keys left out take
distill_llm's defaults (the config dataclasses), not NeMo's yaml ones; `--help` shows both.
"""

import dataclasses
import difflib
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

from distill_llm.data.datasets import DataConfig
from distill_llm.engine.parallel import ParallelConfig
from distill_llm.engine.training import OptimConfig, TrainConfig
from distill_llm.errors import ConfigError, cli_status
from distill_llm.kd.config import KDConfig

MODULE = "distill_llm.megatron_gpt_distillation"  # not __name__: that is __main__ under -m
PROG = f"torchrun --nproc_per_node=N -m {MODULE}"
DEFAULT_OUTPUT_DIR = "runs/megatron_gpt_distillation"
# distill()'s config arguments, by the prefix of a table target ("train.steps" -> TrainConfig)
CONFIGS = {
    "kd": KDConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
}
# distill()'s other arguments and their values when no key sets them
TOP_LEVEL = {
    "teacher": None,
    "student": None,
    "student_checkpoint": None,
    "output_dir": DEFAULT_OUTPUT_DIR,
    "export_nemo": None,
}
# Targets with no default: the command refuses to run without the key that sets them.
REQUIRED = {
    "teacher": "model.kd_teacher_restore_from_path",
    "data.paths": "model.data.data_prefix",
}
# Lightning's trainer.precision spellings -> ParallelConfig.precision. Anything else is passed
# on as written, and ParallelConfig.validate refuses it (as it refuses fp16).
PRECISIONS = {
    "32": "fp32", "32-true": "fp32", "fp32": "fp32", "float32": "fp32",
    "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16", "bfloat16": "bf16",
    "16": "fp16", "16-mixed": "fp16", "16-true": "fp16", "fp16": "fp16", "float16": "fp16",
}  # fmt: skip


# --- values -------------------------------------------------------------------------------------


def _split_items(text: str, token: str) -> List[str]:
    """The comma-separated items of a list's inside, splitting only outside brackets/quotes."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced ']' in {token!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if quote or depth:
        raise ConfigError(f"unclosed {quote or '['} in {token!r}")
    items.append(text[start:])
    if len(items) == 1 and not items[0].strip():
        return []
    if any(not item.strip() for item in items):
        raise ConfigError(f"empty list element in {token!r}")
    return items


def parse_value(text: str, token: Optional[str] = None) -> Any:
    """A Hydra-like literal: null/None -> None, true/false -> bool, int, float, `[a,b,...]` ->
    list (nested lists too), 'quoted' or "quoted" -> that string, anything else -> the string.
    `token` (the whole `key=value`) names the input in errors."""
    token = token or text
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.startswith("[") or text.endswith("]"):
        if not (text.startswith("[") and text.endswith("]")):
            raise ConfigError(f"unbalanced brackets in {token!r}; write a list as [a,b,...]")
        return [parse_value(item, token) for item in _split_items(text[1:-1], token)]
    if text.startswith("{"):
        raise ConfigError(
            f"dictionary values are not supported ({token!r}); give a list like [1.0,path]"
        )
    lowered = text.lower()
    if lowered in ("null", "none"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def parse_overrides(argv: List[str]) -> Dict[str, Any]:
    """`key=value` tokens -> {key: parsed value} (see `parse_value`). A Hydra `+`/`++` prefix is
    dropped (`+model.x=1` is `model.x=1`). Refuses a token without `=`, and a key given twice."""
    out: Dict[str, Any] = {}
    for token in argv:
        key, eq, text = token.partition("=")
        key = key.strip().lstrip("+")
        if not eq or not key:
            raise ConfigError(
                f"malformed argument {token!r}: expected key=value, e.g. trainer.max_steps=100 "
                f"(python -m {MODULE} --help lists the keys)"
            )
        if key in out:
            raise ConfigError(f"{key} is given twice ({out[key]!r} and {text!r}); give it once")
        out[key] = parse_value(text, token)
    return out


# --- converters: (key, parsed value) -> the target's value, or a ConfigError naming the key ------


def _path(key: str, value: Any) -> str:
    if value is None or value == "" or isinstance(value, (bool, list)):
        raise ConfigError(f"{key} needs a path, got {value!r}")
    return str(value)


def _optional_path(key: str, value: Any) -> Optional[str]:
    return None if value is None else _path(key, value)


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    return value


def _steps(key: str, value: Any) -> int:
    if isinstance(value, float):
        raise ConfigError(
            f"{key} must be a whole number of steps or batches, got {value!r} (fractions of an "
            "epoch are not supported)"
        )
    return _int(key, value)


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _text(key: str, value: Any) -> str:
    if value is None or isinstance(value, (bool, list)):
        raise ConfigError(f"{key} needs a value, got {value!r}")
    return str(value)


def _precision(key: str, value: Any) -> str:
    return PRECISIONS.get(str(value).lower(), str(value))


def _devices(key: str, value: Any) -> Optional[int]:
    """A process count per node; None for "auto" or -1 (whatever torchrun started)."""
    if value == "auto" or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a number of processes per node (or auto), got {value!r}")
    return value


def _nodes(key: str, value: Any) -> int:
    value = _int(key, value)
    if value < 1:
        raise ConfigError(f"{key} must be at least 1, got {value}")
    return value


def _data_prefix(key: str, value: Any):
    if value is None or isinstance(value, bool):
        raise ConfigError(f"{key} needs [weight,prefix,...] or a prefix ([] for mock data)")
    return value if isinstance(value, list) else str(value)


def _pairs(key: str, value: Any) -> List[List[str]]:
    ok = isinstance(value, list) and all(
        isinstance(p, list) and all(isinstance(n, str) for n in p) for p in value
    )
    if not ok:
        raise ConfigError(
            f"{key} must be a list of [student_module,teacher_module(,cosine|mse)] lists, e.g. "
            f"[[decoder.final_layernorm,decoder.final_layernorm]], got {value!r}"
        )
    return value


def _logit_layers(key: str, value: Any) -> None:
    if value != ["output_layer", "output_layer"]:
        raise ConfigError(
            f"{key} must be [output_layer,output_layer] (the logits both models' KD loss "
            f"uses), got {value!r}"
        )


class Key(NamedTuple):
    """One supported key: where its value goes, how it is converted, what it means."""

    target: Optional[str]  # "train.steps" = TrainConfig.steps; "teacher" = distill(teacher=);
    # None: checked only (against the launch, or against what distill_llm can do)
    convert: Callable[[str, Any], Any]  # (key, parsed value) -> value; ConfigError on a mistake
    help: str


# The one table of supported keys: the refusal message and --help are generated from it.
SUPPORTED: Dict[str, Key] = {
    "model.kd_teacher_restore_from_path": Key(
        "teacher", _path, "the teacher: .nemo, NeMo 2 dir, HF dir or distill_llm checkpoint"
    ),
    "model.restore_from_path": Key(
        "student_checkpoint", _optional_path,
        "the student to start from; null/None: half the teacher's depth, fresh weights",
    ),
    "model.nemo_path": Key(
        "export_nemo", _optional_path, "write the final student here (.nemo: a NeMo 1 file)"
    ),
    "model.tokenizer.model": Key(
        "data.tokenizer", _optional_path,
        "the data's tokenizer (.model file or HF dir); default: the data's .meta.json, "
        "else the NeMo teacher's own",
    ),
    "model.data.data_prefix": Key(
        "data.paths", _data_prefix,
        "[weight,prefix,...] or one prefix of megatron .bin/.idx data ([] for mock data)",
    ),
    "model.data.splits_string": Key("data.split", _text, "train/valid/test shares"),
    "model.data.index_mapping_dir": Key(
        "data.cache_dir", _optional_path, "megatron's index caches; null: <output_dir>/data_cache"
    ),
    "model.data.eod_mask_loss": Key(
        "data.eod_mask_loss", _bool, "leave end-of-document targets out of the loss"
    ),
    "model.encoder_seq_length": Key(
        "train.seq_length", _int, "tokens per training sequence (NeMo's yaml: 4096)"
    ),
    "model.data.seq_length": Key(
        "train.seq_length", _int, "the same as model.encoder_seq_length (give one, or equal ones)"
    ),
    "model.micro_batch_size": Key(
        "train.micro_batch_size", _int, "sequences per forward pass per data-parallel rank"
    ),
    "model.global_batch_size": Key("train.global_batch_size", _int, "sequences per step"),
    "model.seed": Key("train.seed", _int, "weights init, dropout and data order"),
    "model.tensor_model_parallel_size": Key(
        "parallel.tensor_parallel", _int, "tensor-parallel size"
    ),
    "model.pipeline_model_parallel_size": Key(
        "parallel.pipeline_parallel", _int, "pipeline-parallel size (NeMo 1 refused > 1)"
    ),
    "model.optim.lr": Key("optim.lr", _float, "peak learning rate (NeMo's yaml: 1e-4)"),
    "model.optim.weight_decay": Key(
        "optim.weight_decay", _float, "AdamW weight decay (NeMo's yaml: 0.1)"
    ),
    "model.optim.sched.min_lr": Key(
        "optim.min_lr", _float, "cosine decay floor (NeMo's yaml: 1e-5)"
    ),
    "model.optim.sched.warmup_steps": Key(
        "optim.warmup_steps", _int, "linear warm-up steps (NeMo's yaml: 50)"
    ),
    "model.kd_config.temperature": Key(
        "kd.temperature", _float, "divides both models' logits (NeMo 1: fixed 1.0)"
    ),
    "model.kd_config.logit_kl_temperature": Key(
        "kd.temperature", _float, "ModelOpt's name for model.kd_config.temperature"
    ),
    "model.kd_config.temperature_squared": Key(
        "kd.temperature_squared", _bool, "multiply the logits loss by T^2 (ModelOpt does not)"
    ),
    "model.kd_config.kind": Key(
        "kd.kind", _text, "forward_kl (NeMo 1's LogitsKLLoss) | reverse_kl | jsd | tvd"
    ),
    "model.kd_config.beta": Key("kd.beta", _float, "jsd's mixture weight of the teacher"),
    "model.kd_config.skip_lm_loss": Key(
        "kd.skip_lm_loss", _bool, "train on the KD loss alone (NeMo: true)"
    ),
    "model.kd_config.kd_loss_scale": Key(
        "kd.kd_loss_scale", _float, "KD weight relative to the LM loss when skip_lm_loss=false"
    ),
    "model.kd_config.intermediate_layer_pairs": Key(
        "kd.intermediate_pairs", _pairs,
        "[[student_module,teacher_module(,cosine|mse)],...] hidden-state losses",
    ),
    "model.kd_config.logit_layers": Key(
        None, _logit_layers, "accepted as [output_layer,output_layer] only"
    ),
    "trainer.precision": Key(
        "parallel.precision", _precision, "32 / 32-true -> fp32; bf16 / bf16-mixed -> bf16"
    ),
    "trainer.devices": Key(
        None, _devices, "must equal the processes per node (torchrun --nproc_per_node)"
    ),
    "trainer.num_nodes": Key(None, _nodes, "must equal the nodes torchrun started (--nnodes)"),
    "trainer.max_steps": Key("train.steps", _int, "optimizer steps (NeMo's yaml: 100000)"),
    "trainer.val_check_interval": Key(
        "train.val_every", _steps, "steps between validations (NeMo's yaml: 100)"
    ),
    "trainer.limit_val_batches": Key(
        "train.val_batches", _steps, "global batches per validation (NeMo's yaml: 50)"
    ),
    "trainer.log_every_n_steps": Key("train.log_every", _int, "steps between metrics lines"),
    "trainer.gradient_clip_val": Key("optim.clip_grad", _float, "max gradient norm (0: off)"),
    "exp_manager.exp_dir": Key(
        "output_dir", _optional_path, "the run directory; a rerun resumes from its latest"
    ),
    "exp_manager.explicit_log_dir": Key(
        "output_dir", _optional_path, "the same as exp_manager.exp_dir"
    ),
}  # fmt: skip

# Keys NeMo 1's megatron_llama_distill.yaml has that are accepted and ignored, with why. A key
# ending in ".*" covers every key under it.
IGNORED_KEYS: Dict[str, str] = {
    "trainer.accelerator": "a GPU is used when one is visible, else the CPU",
    "trainer.logger": "metrics always go to <output_dir>/metrics.jsonl and TensorBoard",
    "trainer.enable_checkpointing": "checkpoints always go to <output_dir>",
    "trainer.use_distributed_sampler": "megatron-core's samplers are always used",
    "trainer.max_epochs": "training length is trainer.max_steps",
    "trainer.accumulate_grad_batches": "accumulation follows from the batch sizes, as in NeMo",
    "trainer.limit_test_batches": "no test pass is run",
    "trainer.benchmark": "cuDNN autotuning does not apply to these models",
    "trainer.enable_model_summary": "the run prints its own summary",
    "exp_manager.name": "the run directory is exp_manager.exp_dir itself",
    "exp_manager.create_checkpoint_callback": "checkpoints always go to <output_dir>",
    "exp_manager.checkpoint_callback_params.*": "checkpoints: <output_dir>/latest and final",
    "exp_manager.resume_if_exists": "a rerun always resumes from <output_dir>'s latest",
    "exp_manager.resume_ignore_no_checkpoint": "no checkpoint means a fresh start",
    "exp_manager.create_wandb_logger": "no Weights & Biases logging",
    "exp_manager.wandb_logger_kwargs.*": "no Weights & Biases logging",
    "model.mcore_gpt": "models are always megatron-core GPTs",
    "model.transformer_engine": "the layer implementation is chosen by distill_llm",
    "model.megatron_amp_O2": "bf16 always keeps fp32 master weights in the optimizer",
    "model.sequence_parallel": "not implemented: tensor parallel runs without it (more memory)",
    "model.tokenizer.library": "the tokenizer kind is read from model.tokenizer.model",
    "model.data.data_impl": "data is always megatron's mmap indexed dataset",
    "model.data.num_workers": "batches are read in the training process",
    "model.data.skip_warmup": "mmap warm-up does not apply",
    "model.data.dataloader_type": "megatron-core's single-pass sampler",
    "model.optim.name": "the optimizer is always AdamW (megatron-core adam)",
    "model.optim.sched.name": "the schedule is always linear warm-up then cosine decay",
}


def ignored_reason(key: str) -> Optional[str]:
    """Why `key` is accepted and ignored (its IGNORED_KEYS entry), or None if it is not."""
    if key in IGNORED_KEYS:
        return IGNORED_KEYS[key]
    for pattern, reason in IGNORED_KEYS.items():
        if pattern.endswith(".*") and key.startswith(pattern[:-1]):
            return reason
    return None


def _unknown(key: str) -> ConfigError:
    """The one-line refusal of an unknown key: a close match if any, then every supported key."""
    close = difflib.get_close_matches(key, list(SUPPORTED) + list(IGNORED_KEYS), n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(
        f"unknown key {key}{hint}; supported: {', '.join(SUPPORTED)} (and the ignored keys "
        f"python -m {MODULE} --help lists)"
    )


def _check_launch(devices: Optional[int], num_nodes: Optional[int], env: Mapping) -> None:
    """Refuse trainer.devices / trainer.num_nodes that differ from what torchrun started
    (LOCAL_WORLD_SIZE processes per node, WORLD_SIZE in all; a plain process is 1 of 1)."""
    if "LOCAL_WORLD_SIZE" in env:
        local = int(env["LOCAL_WORLD_SIZE"])
    elif "WORLD_SIZE" not in env:
        local = 1  # a plain process, as distill treats it
    else:
        return  # a launcher that does not say how many processes share a node
    world = int(env.get("WORLD_SIZE", local))
    if devices is not None and devices != local:
        launched = (
            f"torchrun started {local} processes per node"
            if "LOCAL_WORLD_SIZE" in env
            else "this is one process, not a torchrun launch"
        )
        raise ConfigError(
            f"trainer.devices={devices} but {launched}; launch with torchrun "
            f"--nproc_per_node={devices} or set trainer.devices={local}"
        )
    nodes = world // local
    if num_nodes is not None and num_nodes != nodes:
        raise ConfigError(
            f"trainer.num_nodes={num_nodes} but the job has {nodes} node(s) (WORLD_SIZE={world} / "
            f"LOCAL_WORLD_SIZE={local}); launch with torchrun --nnodes={num_nodes} or set "
            f"trainer.num_nodes={nodes}"
        )


def to_distill_kwargs(
    overrides: Dict[str, Any], environ: Optional[Mapping[str, str]] = None
) -> Dict[str, Any]:
    """`parse_overrides`'s {key: value} -> the keyword arguments of `distill_llm.api.distill`
    (teacher, student, student_checkpoint, kd, data, train, optim, parallel, output_dir,
    export_nemo). Unset fields keep the dataclasses' defaults. Checks trainer.devices and
    trainer.num_nodes against `environ` (torchrun's LOCAL_WORLD_SIZE / WORLD_SIZE; default
    os.environ); builds nothing else and touches no file. Raises ConfigError for an unknown key,
    a value of the wrong type, two keys setting one field differently, or a missing teacher or
    data prefix."""
    env = os.environ if environ is None else environ
    values: Dict[str, tuple] = {}  # target -> (key, value)
    checked: Dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in SUPPORTED:
            if ignored_reason(key) is None:
                raise _unknown(key)
            continue
        spec = SUPPORTED[key]
        value = spec.convert(key, raw)
        if value is None:  # null: the default, as in NeMo's yaml (restore_from_path: null)
            continue
        if spec.target is None:
            checked[key] = value
        elif spec.target in values and values[spec.target][1] != value:
            first, before = values[spec.target]
            raise ConfigError(
                f"{first}={before!r} and {key}={value!r} both set {spec.target}; give one"
            )
        else:
            values[spec.target] = (key, value)
    _check_launch(checked.get("trainer.devices"), checked.get("trainer.num_nodes"), env)
    for target, key in REQUIRED.items():
        if target not in values:
            raise ConfigError(f"{key} is required ({SUPPORTED[key].help})")
    kwargs = dict(TOP_LEVEL)
    fields: Dict[str, Dict[str, Any]] = {name: {} for name in CONFIGS}
    for target, (_, value) in values.items():
        group, _, name = target.partition(".")
        if name:
            fields[group][name] = value
        else:
            kwargs[target] = value
    kwargs.update({group: cls(**fields[group]) for group, cls in CONFIGS.items()})
    return kwargs


def _default(target: Optional[str]) -> str:
    """What a key's target is when the key is not given, as --help shows it."""
    if target is None:
        return ""
    if target in REQUIRED:
        return " (required)"
    group, _, name = target.partition(".")
    if not name:
        value = TOP_LEVEL[group]
    else:
        field = {f.name: f for f in dataclasses.fields(CONFIGS[group])}[name]
        value = field.default
        if value is dataclasses.MISSING:
            value = field.default_factory()
    return " = null" if value is None else f" = {value!r}"


def usage() -> str:
    """The --help text: the launch line, then every supported key (target, default, meaning)
    and every ignored key with its reason."""
    width = max(map(len, list(SUPPORTED) + list(IGNORED_KEYS))) + 2
    lines = [
        f"usage: {PROG} key=value ...",
        "",
        "NeMo 1's megatron_gpt_distillation.py command line, run by distill_llm.distill.",
        "Values are Hydra-like: null, true/false, numbers, [a,b,...], 'quoted'; a leading + on",
        "a key is dropped. Any key not listed here is refused.",
        "",
        "supported keys (-> the distill() argument or config field it sets = its default):",
    ]
    for key, spec in SUPPORTED.items():
        target = f"-> {spec.target}{_default(spec.target)}" if spec.target else "(checked)"
        lines.append(f"  {key:<{width}}{target}: {spec.help}")
    lines += ["", "accepted and ignored:"]
    lines += [f"  {key:<{width}}{reason}" for key, reason in IGNORED_KEYS.items()]
    return "\n".join(lines)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _run(argv: List[str]) -> dict:
    """Parse, map, print the plan (rank 0), run distill, print its outcome (rank 0)."""
    overrides = parse_overrides(argv)
    kwargs = to_distill_kwargs(overrides)
    if _is_rank0():
        for key, value in overrides.items():
            reason = ignored_reason(key) if key not in SUPPORTED else None
            if reason:
                print(f"note: ignoring {key}={value!r}: {reason}", flush=True)
        train = kwargs["train"]
        print(
            f"megatron_gpt_distillation: teacher {kwargs['teacher']}, student "
            f"{kwargs['student_checkpoint'] or 'default (half the teacher depth)'}; "
            f"{train.steps} steps x {train.global_batch_size} sequences x {train.seq_length} "
            f"tokens, lr {kwargs['optim'].lr:g}, {kwargs['parallel'].precision}, "
            f"TP {kwargs['parallel'].tensor_parallel}; run directory {kwargs['output_dir']}",
            flush=True,
        )
    from distill_llm import api  # megatron-core loads once a run starts

    summary = api.distill(**kwargs)
    if _is_rank0():
        valid = summary.get("valid") or {}
        loss = valid.get("val_lm_loss")
        saved = summary.get("export_nemo") or kwargs["export_nemo"]
        print(
            f"megatron_gpt_distillation: done at step {summary.get('step')}"
            + (f", val_lm_loss {loss:.4f}" if loss is not None else "")
            + f"; final checkpoint {summary.get('final')}"
            + (f"; saved {saved}" if saved else "; no model.nemo_path, no .nemo written"),
            flush=True,
        )
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: 0 after a finished run, 2 with one `error:` line for a user mistake;
    `--help` prints the supported keys."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage())
        return 0
    return cli_status(lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
