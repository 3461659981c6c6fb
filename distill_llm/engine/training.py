"""The training loop on megatron-core: micro-batches, DDP, optimizer, schedule, validation,
checkpoints. It trains a plain GPT (pretraining) or a ModelOpt distillation wrapper alike.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from distill_llm.data.datasets import DataModule
from distill_llm.engine import checkpoint, parallel
from distill_llm.engine.model import ModelConfig
from distill_llm.engine.run_dir import RunLog
from distill_llm.errors import ConfigError

# Per micro-batch the loss function reports these token sums, in this order.
_REPORT = ("lm", "kd", "intermediate", "tokens")  # "kd": the logits loss


@dataclass
class TrainConfig:
    """How long and on what batches to train, and how often to log, validate and save."""

    steps: int = 100  # optimizer steps
    micro_batch_size: int = 4  # sequences per forward pass on one data-parallel rank
    global_batch_size: int = 8  # sequences per optimizer step, over all micro-batches and DP ranks
    seq_length: int = 128  # tokens per sequence
    log_every: int = 1  # steps between train entries in metrics.jsonl
    val_every: int = 50  # steps between validations (0: only after the last step)
    val_batches: int = 2  # global batches of held-out data per validation
    save_every: int = 0  # steps between checkpoints (0: only after the last step)
    seed: int = 1234  # weights init, dropout, data order

    def validate(self) -> None:
        """Raises ConfigError when a count or interval is out of range or seq_length < 2."""
        for name in ("steps", "log_every", "val_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("val_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_length < 2:
            raise ConfigError(f"train.seq_length must be at least 2, got {self.seq_length}")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to `min_lr`."""

    lr: float = 3e-4  # peak learning rate, reached after the warm-up
    min_lr: float = 3e-5  # floor of the cosine decay
    warmup_steps: int = 10  # linear warm-up from 0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # max global gradient norm (0 disables clipping)

    def validate(self) -> None:
        """Raises ConfigError unless lr > 0, 0 <= min_lr <= lr and warmup_steps >= 0."""
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(
                f"optim: need lr > 0 and 0 <= min_lr <= lr, got {self.lr}, {self.min_lr}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


def build_optimizer(ddp_model, optim: OptimConfig, train: TrainConfig, parallel_cfg):
    """megatron-core optimizer (AdamW, fp32 master weights under bf16) and LR scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = parallel_cfg.precision == "bf16"
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=parallel_cfg.params_dtype,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    warmup = min(optim.warmup_steps, max(train.steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(train.steps, 1),  # megatron needs > 0
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(train.steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def wrap_ddp(model, parallel_cfg):
    """megatron-core DistributedDataParallel with fp32 gradient accumulation."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        average_in_collective=False,  # the loss is a token sum; grads are scaled by 1/tokens
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def _to_device(batch: dict) -> dict:
    if torch.cuda.is_available():
        return {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return batch


def _loss_func(batch: dict, teacher, training: bool, output_tensor):
    """THE loss function: the token-summed loss of one micro-batch, its token count and the
    report sums. `output_tensor`: the model's per-token LM loss `[b, s]`, or its logits
    `[b, s, V/TP]` when `teacher.wants_logits`. `teacher` (None to pretrain) is the KD side:
    kd.wrapper.OnlineTeacher or kd.offline.CachedTeacher, each mixing through KDCriterion."""
    mask = batch["loss_mask"]
    tokens = mask.sum().float()
    if teacher is None:
        lm_sum = (output_tensor.float().reshape(-1) * mask.reshape(-1).float()).sum()
        terms = {"total": lm_sum, "lm": lm_sum}
    else:
        terms = teacher.terms(output_tensor, batch, training)
    zero = torch.zeros_like(terms["lm"])
    sums = [terms.get(k, zero).detach().float() for k in ("lm", "logits", "intermediate")]
    report = torch.stack(sums + [tokens])
    return terms["total"], tokens.int(), {"sums": report}


def _forward_step(teacher, data_iterator, model):
    batch = _to_device(next(data_iterator))
    labels = None if teacher is not None and teacher.wants_logits else batch["labels"]
    output = model(batch["tokens"], batch["position_ids"], None, labels=labels)
    return output, partial(_loss_func, batch, teacher, model.training)


# megatron's router-loss tracker names -> the metrics.jsonl key
_MOE_TRACKED = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


def moe_router_losses(cfg: ModelConfig, num_microbatches: int) -> dict[str, float]:
    """The student's MoE router losses over the step just taken, as megatron's routers
    recorded them (before their coefficients), then cleared: `moe_aux_loss` (the load-
    balancing loss) and `moe_z_loss`, each the mean over MoE layers, micro-batches and data-
    parallel ranks. Empty for a dense student. A collective: every rank calls it."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    if not cfg.is_moe:
        return {}
    wanted = {}
    if cfg.moe_aux_loss_coeff > 0 and cfg.moe_load_balancing in _MOE_TRACKED:
        wanted["moe_aux_loss"] = _MOE_TRACKED[cfg.moe_load_balancing]
    if cfg.moe_z_loss_coeff:
        wanted["moe_z_loss"] = "z_loss"
    tracker = get_moe_layer_wise_logging_tracker()
    out = {}
    for key, name in wanted.items():
        entry = tracker.get(name)
        # a pipeline stage without MoE layers has no entry, yet joins the reductions
        values = entry["values"].clone() if entry else torch.zeros(cfg.num_layers)
        dist = torch.distributed
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        for group in (
            parallel_state.get_tensor_model_parallel_group(),  # the same tokens on each rank
            parallel_state.get_data_parallel_group(),
        ):
            dist.all_reduce(values, group=group)
            values /= dist.get_world_size(group)
        out[key] = float(values.sum()) / (sum(cfg.moe_layer_pattern) * num_microbatches)
        if entry:
            entry["values"].zero_()
    return out


def _reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Token-weighted means over all micro-batches and data-parallel ranks."""
    from megatron.core import parallel_state

    # Only the last pipeline stage computes losses; the others add zeros, so every rank (the
    # logging rank 0 sits on the first stage) ends up with the same figures.
    sums = torch.stack([r["sums"] for r in reports]).sum(0) if reports else torch.zeros(4)
    if torch.cuda.is_available():
        sums = sums.cuda()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    sums = dict(zip(_REPORT, sums.tolist()))
    n = max(sums.pop("tokens"), 1.0)
    return {k: v / n for k, v in sums.items()}


class Trainer:
    """Runs `train.steps` optimizer steps of `model` (GPT or distillation wrapper)."""

    def __init__(
        self,
        *,
        model,
        student_cfg: ModelConfig,
        data: DataModule,
        train: TrainConfig,
        optim: OptimConfig,
        parallel_cfg,
        run_dir: Path,
        teacher=None,
    ):
        from megatron.core.distributed import finalize_model_grads

        self.train_cfg = train
        self.data = data
        self.run_dir = run_dir
        self.student_cfg = student_cfg
        self.inner = model
        # The KD side of the loss (kd.wrapper.OnlineTeacher, kd.offline.CachedTeacher), or
        # None to pretrain; the engine calls it without knowing which.
        self.teacher = teacher
        self.is_distillation = teacher is not None
        self.ddp = wrap_ddp(model, parallel_cfg)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, optim, train, parallel_cfg)
        config = model.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.ddp.no_sync
        self.step = 0
        self.consumed_samples = 0

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        """The directory of training checkpoints, `<run_dir>/checkpoints`."""
        return self.run_dir / "checkpoints"

    def maybe_resume(self) -> bool:
        """Loads the `latest` training checkpoint, if any, with its step and consumed samples;
        True when it resumed. ConfigError when that checkpoint's sample stream differs."""
        latest = checkpoint.latest_checkpoint(self.ckpt_root)
        if latest is None:
            return False
        saved_stream = checkpoint.read_metadata(latest).get("data_stream")
        if saved_stream and saved_stream != self.data.stream_id:
            raise ConfigError(
                f"{latest} was trained on a different sample stream (data paths, split, "
                "seq_length, seed, eod_mask_loss or the number of steps changed); resuming would "
                "repeat or skip samples. Restore those settings, or use a new run_dir"
            )
        progress = checkpoint.load_training(
            latest, model=self.inner, optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.step = progress["step"]
        self.consumed_samples = progress["consumed_samples"]
        if parallel.is_main():
            print(f"resumed from {latest} at step {self.step}", flush=True)
        return True

    def save(self) -> None:
        """Saves a resumable checkpoint (model, optimizer, scheduler, progress) in `ckpt_root`."""
        checkpoint.save_training(
            self.ckpt_root,
            step=self.step,
            consumed_samples=self.consumed_samples,
            model=self.inner,  # not the DDP wrapper: same tensor keys as final/
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            model_cfg=self.student_cfg,
            data_stream=self.data.stream_id,
        )

    def save_final(self) -> Path:
        """The student alone: no teacher, no optimizer, no KD projection layers."""
        target = self.run_dir / "final"
        with self.teacher.student_only() if self.teacher else contextlib.nullcontext():
            checkpoint.save_model(target, self.inner, self.student_cfg, step=self.step)
        return target

    # -- steps --------------------------------------------------------------------------------
    def _forward_backward(self, iterator, num_microbatches: int, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        shapes = dict(
            seq_length=self.train_cfg.seq_length, micro_batch_size=self.data.plan.micro_batch_size
        )
        extra = {}
        if self.teacher is not None:
            adjust = self.teacher.adjust_tensor_shapes([self.ddp], **shapes)
            if adjust is not None:
                extra["adjust_tensor_shapes_fn"] = adjust
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, self.teacher),
            data_iterator=iterator,
            model=[self.ddp],
            num_microbatches=num_microbatches,
            forward_only=forward_only,
            **shapes,
            **extra,
        )

    def train_step(self, iterator) -> dict[str, float]:
        """One optimizer step over a global batch from `iterator`: the token-weighted mean
        "lm", "kd" and "intermediate" losses, plus "grad_norm" (and an MoE student's
        "moe_aux_loss" / "moe_z_loss")."""
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._forward_backward(iterator, self.data.plan.num_microbatches, False)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError(f"optimizer step {self.step + 1} skipped (non-finite gradients)")
        self.scheduler.step(increment=1)
        self.step += 1
        self.consumed_samples += self.data.plan.global_batch_size
        losses = _reduce_reports(reports)
        losses["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        losses.update(moe_router_losses(self.student_cfg, self.data.plan.num_microbatches))
        return losses

    @torch.no_grad()
    def validate(self) -> dict:
        """The "valid" event for metrics.jsonl, from `train.val_batches` global batches of
        validation data: val_lm_loss, val_ppl, and the KD losses when distilling (else None)."""
        self.ddp.eval()
        n = self.train_cfg.val_batches
        reports = self._forward_backward(
            self.data.valid_batches(n), n * self.data.plan.num_microbatches, True
        )
        self.ddp.train()
        losses = _reduce_reports(reports)
        return {
            "kind": "valid",
            "step": self.step,
            "val_lm_loss": losses["lm"],
            "val_ppl": math.exp(min(losses["lm"], 50.0)),
            "val_kd_loss": losses["kd"] if self.is_distillation else None,
            "val_intermediate_loss": losses["intermediate"] if self.is_distillation else None,
        }

    def fit(self) -> dict:
        """Train to `train.steps`, resuming from `latest` if the run directory has one."""
        cfg = self.train_cfg
        resumed = self.maybe_resume()
        log = RunLog(self.run_dir, cfg.steps, self.step)
        if not resumed and cfg.val_every:
            log.log(self.validate())  # the starting point of every validation curve
        tokens_per_step = self.data.plan.global_batch_size * cfg.seq_length
        iterator = self.data.train_batches(self.consumed_samples)
        step_times: list[float] = []
        last_valid = None
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                losses = self.train_step(iterator)
                dt = time.perf_counter() - t0
                step_times.append(dt)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    recent = step_times[-20:]
                    mean_dt = sum(recent) / len(recent)
                    log.log(
                        {
                            "kind": "train",
                            "step": self.step,
                            "lm_loss": losses["lm"],
                            "kd_loss": losses["kd"] if self.is_distillation else None,
                            "intermediate_loss": losses["intermediate"]
                            if self.is_distillation
                            else None,
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "grad_norm": losses["grad_norm"],
                            **{k: losses[k] for k in ("moe_aux_loss", "moe_z_loss") if k in losses},
                            "tokens_per_s": tokens_per_step / dt,
                            "step_time_s": dt,
                            "eta_s": mean_dt * (cfg.steps - self.step),
                        }
                    )
                if cfg.val_every and self.step % cfg.val_every == 0 and self.step < cfg.steps:
                    last_valid = self.validate()
                    log.log(last_valid)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
            last_valid = self.validate()
            log.log(last_valid)
            self.save()
            final = self.save_final()
        finally:
            log.close()
        return {"step": self.step, "final": str(final), "valid": last_valid}
