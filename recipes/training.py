"""Factories for the KD loss, optimizer and schedule, training length and parallel layout."""

from typing import List, Optional

import nemo_run as run

from distill_llm.engine.parallel import ParallelConfig
from distill_llm.engine.training import OptimConfig, TrainConfig
from distill_llm.kd.config import KDConfig
from distill_llm.recipes import data


@run.cli.factory
def kd_loss(
    temperature: float = 1.0,
    skip_lm_loss: bool = True,
    kd_loss_scale: float = 1.0,
    intermediate_pairs: Optional[List[List[str]]] = None,
    kind: str = "forward_kl",
    temperature_squared: bool = True,
    beta: float = 0.5,
    alpha: Optional[float] = None,
    intermediate_weight: float = 1.0,
    chunk_size: Optional[int] = None,
    cache_top_k: Optional[int] = None,
    fused_output_layer: bool = False,
) -> run.Config[KDConfig]:
    """Logits KD (`kind`: forward_kl, reverse_kl, jsd with `beta`, tvd; at `temperature`, times
    T^2 unless `temperature_squared=False`), alone or with the student's LM loss: statically,
    (1 - alpha) LM + alpha KD, or with ModelOpt's dynamic balancer (`alpha=None`,
    `skip_lm_loss=False`, weighted by `kd_loss_scale`); plus optional intermediate pairs.
    `chunk_size`: positions per chunk of the logits loss (memory-lean for big vocabularies);
    `fused_output_layer`: the student's logits are never built (KD-only training);
    `cache_top_k`: with a teacher cache, the k it must hold."""
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
    lr: float = 3e-4, min_lr: float = 3e-5, warmup_steps: int = 10, weight_decay: float = 0.01
) -> run.Config[OptimConfig]:
    """AdamW (beta2 0.95, clip 1.0), linear warm-up then cosine decay to `min_lr`."""
    return run.Config(
        OptimConfig, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, weight_decay=weight_decay
    )


@run.cli.factory
def trainer(
    steps: int = 100,
    micro_batch_size: int = 1,
    global_batch_size: int = 8,
    seq_length: int = 4096,
    val_every: int = 50,
    save_every: int = 50,
) -> run.Config[TrainConfig]:
    """Training length, batch sizes (global = micro x accumulation x data parallel) and the
    validation / checkpoint cadence."""
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
    tensor_parallel: int = 1,
    precision: str = "bf16",
    distributed_optimizer: bool = True,
    pipeline_parallel: int = 1,
) -> run.Config[ParallelConfig]:
    """Tensor- and pipeline-parallel sizes (the rest of the processes are data parallel),
    precision, and whether optimizer states are sharded over data-parallel ranks."""
    return run.Config(
        ParallelConfig,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        precision=precision,
        use_distributed_optimizer=distributed_optimizer,
    )


def gpu_kd_settings(steps: int) -> dict:
    """What the published-model recipes share: logits KD at T=1 on the KD loss alone, data
    from `data.paths`, 4096-token sequences, global batch 128, AdamW 1e-4 with cosine decay,
    TP=2 in bf16 with the distributed optimizer (8 GPUs per node). The logits loss runs 1024
    positions at a time: the 128k-256k vocabularies make each full-vocabulary float32 copy of a
    4096-token micro-batch 1-2 GiB per TP rank."""
    return dict(
        kd=kd_loss(temperature=1.0, skip_lm_loss=True, chunk_size=1024),
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
        parallel=layout(tensor_parallel=2, precision="bf16"),
    )
