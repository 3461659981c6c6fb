"""Factories for the KD loss, optimizer and schedule, training length and parallel layout."""

from typing import List, Optional

import nemo_run as run

from distill_llm.engine.parallel import ParallelConfig
from distill_llm.engine.training import OptimConfig, TrainConfig
from distill_llm.kd.config import KDConfig
from distill_llm.recipes import data

# Every factory's defaults ARE the dataclasses' (KDConfig, TrainConfig, OptimConfig,
# ParallelConfig): one default per field, stated once. Where a recipe deliberately differs
# (bf16, 4096-token sequences on GPUs), it says so in the recipe (see gpu_kd_settings).
_KD, _TRAIN, _OPTIM, _PAR = KDConfig, TrainConfig, OptimConfig, ParallelConfig


@run.cli.factory
def kd_loss(
    temperature: float = _KD.temperature,
    skip_lm_loss: bool = _KD.skip_lm_loss,
    kd_loss_scale: float = _KD.kd_loss_scale,
    intermediate_pairs: Optional[List[List[str]]] = None,
    kind: str = _KD.kind,
    temperature_squared: bool = _KD.temperature_squared,
    beta: float = _KD.beta,
    alpha: Optional[float] = _KD.alpha,
    intermediate_weight: float = _KD.intermediate_weight,
    chunk_size: Optional[int] = _KD.chunk_size,
    cache_top_k: Optional[int] = _KD.cache_top_k,
    fused_output_layer: bool = _KD.fused_output_layer,
) -> run.Config[KDConfig]:
    """Logits KD (`kind`: forward_kl, reverse_kl, jsd with `beta`, tvd; at `temperature`, times
    T^2 unless `temperature_squared=False`), alone or with the student's LM loss: statically,
    (1 - alpha) LM + alpha KD, or with ModelOpt's dynamic balancer (`alpha=None`,
    `skip_lm_loss=False`, weighted by `kd_loss_scale`); plus optional intermediate pairs.
    `chunk_size`: positions per chunk of the logits loss (None: all at once);
    `fused_output_layer`: the student's logits are never built (KD-only training);
    `cache_top_k`: with a teacher cache, the k it must hold. Defaults: KDConfig's."""
    return run.Config(
        KDConfig,
        kind=kind,
        temperature=temperature,
        temperature_squared=temperature_squared,
        beta=beta,
        skip_lm_loss=skip_lm_loss,
        alpha=alpha,
        kd_loss_scale=kd_loss_scale,
        intermediate_pairs=list(intermediate_pairs or []),
        intermediate_weight=intermediate_weight,
        chunk_size=chunk_size,
        cache_top_k=cache_top_k,
        fused_output_layer=fused_output_layer,
    )


@run.cli.factory
def adamw_cosine(
    lr: float = _OPTIM.lr,
    min_lr: float = _OPTIM.min_lr,
    warmup_steps: int = _OPTIM.warmup_steps,
    weight_decay: float = _OPTIM.weight_decay,
) -> run.Config[OptimConfig]:
    """AdamW (beta2 0.95, clip 1.0), linear warm-up then cosine decay to `min_lr`.
    Defaults: OptimConfig's."""
    return run.Config(
        OptimConfig, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay
    )


@run.cli.factory
def trainer(
    steps: int = _TRAIN.steps,
    micro_batch_size: int = _TRAIN.micro_batch_size,
    global_batch_size: int = _TRAIN.global_batch_size,
    seq_length: int = _TRAIN.seq_length,
    val_every: int = _TRAIN.val_every,
    save_every: int = _TRAIN.save_every,
) -> run.Config[TrainConfig]:
    """Training length, batch sizes (global = micro x accumulation x data parallel) and the
    validation / checkpoint cadence. Defaults: TrainConfig's."""
    return run.Config(
        TrainConfig,
        steps=steps,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        seq_length=seq_length,
        val_every=val_every,
        save_every=save_every,
    )


@run.cli.factory
def layout(
    tensor_parallel: int = _PAR.tensor_parallel,
    precision: str = _PAR.precision,
    use_distributed_optimizer: bool = _PAR.use_distributed_optimizer,
    pipeline_parallel: int = _PAR.pipeline_parallel,
) -> run.Config[ParallelConfig]:
    """Tensor- and pipeline-parallel sizes (the rest of the processes are data parallel),
    precision, and whether optimizer states are sharded over data-parallel ranks.
    Defaults: ParallelConfig's."""
    return run.Config(
        ParallelConfig,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        precision=precision,
        use_distributed_optimizer=use_distributed_optimizer,
    )


def gpu_kd_settings(steps: int) -> dict:
    """What the published-model recipes share, and where they deliberately differ from the
    dataclass defaults (which suit a CPU): 4096-token sequences (the models' pretraining length)
    with micro-batch 1 and global batch 128; AdamW at 1e-4 (fine-tuning pretrained-size models);
    TP=2 in bf16 with the distributed optimizer (8 GPUs per node: bf16 halves memory and uses
    the tensor cores; sharded Adam states free the room KD needs for the teacher). The logits
    loss runs 1024 positions at a time (default 256): the 128k-256k vocabularies make each
    full-vocabulary float32 copy of a 4096-token micro-batch 1-2 GiB per TP rank, and larger
    chunks amortise the per-chunk overhead on a GPU."""
    return dict(
        kd=kd_loss(chunk_size=1024),
        data=data.blend(),
        train=trainer(
            steps=steps,
            micro_batch_size=1,
            global_batch_size=128,
            seq_length=4096,
            val_every=100,
            save_every=100,
        ),  # fmt: skip
        optim=adamw_cosine(lr=1e-4, min_lr=1e-5, warmup_steps=50),
        parallel=layout(tensor_parallel=2, precision="bf16", use_distributed_optimizer=True),
    )
