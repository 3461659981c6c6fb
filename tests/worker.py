"""Runs a list of distill_llm operations from a JSON spec, under torchrun or alone.

    torchrun --nproc_per_node=2 tests/worker.py spec.json

Ops: init_model, distill, pretrain, export_nemo, logits (gathered full-vocab logits of a
checkpoint for fixed random tokens, or op's saved `tokens`, at op's tensor_parallel /
expert_parallel, saved by rank 0),
weights (a checkpoint's tensors at TP=1), attention_paths (one model's logits with SDPA and
with megatron's unfused attention).
`kill` simulates a crash: {"after_save": N} SIGKILLs the process right after the N-th training
checkpoint is committed; {"during_save": N} SIGKILLs it in the N-th save after the shards are
written but before the checkpoint is committed. The whole process group dies (torchrun, every
rank, dist_checkpointing's helper processes), as in a node failure; the launcher in conftest.py
gives each worker its own group.
"""

import json
import os
import signal
import sys

import torch


def _kill_hooks(kill: dict) -> None:
    from megatron.core import dist_checkpointing

    from distill_llm.engine import checkpoint

    if "after_save" in kill:
        real, count = checkpoint.save_training, [0]

        def save_then_die(*args, **kwargs):
            out = real(*args, **kwargs)
            count[0] += 1
            if count[0] == kill["after_save"]:
                os.killpg(os.getpgid(0), signal.SIGKILL)  # with helper processes
            return out

        checkpoint.save_training = save_then_die
    if "during_save" in kill:
        real_save, count = dist_checkpointing.save, [0]

        def die_mid_save(*args, **kwargs):
            out = real_save(*args, **kwargs)
            count[0] += 1
            if count[0] == kill["during_save"]:
                os.killpg(os.getpgid(0), signal.SIGKILL)  # with helper processes
            return out

        dist_checkpointing.save = die_mid_save


def _record_teacher(path: str) -> None:
    """After the run, save the in-memory teacher's weights as they were at the end."""
    import atexit

    from distill_llm.kd import wrapper

    real = wrapper.build_distillation_model

    def build(student, teacher, cfg):
        atexit.register(
            lambda: torch.save(
                {k: v.clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}, path
            )
        )
        return real(student, teacher, cfg)

    wrapper.build_distillation_model = build


def _logits(op: dict) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from distill_llm.engine import parallel
    from distill_llm.engine.model import build_gpt
    from distill_llm.formats import paths

    cfg = paths.model_config_of(op["checkpoint"])
    tp, ep = op.get("tensor_parallel", 1), op.get("expert_parallel", 1)
    layout = parallel.ParallelConfig(tensor_parallel=tp, expert_parallel=ep)
    parallel.initialize(layout, seed=op.get("seed", 99))
    model = build_gpt(cfg, tensor_parallel=tp)
    paths.load_model(op["checkpoint"], model, cfg, role="model")
    model.eval()
    if op.get("tokens"):  # a saved [b, s] tensor of token ids, e.g. real text
        tokens = torch.load(op["tokens"])
    else:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, None)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
    if parallel.is_main():
        torch.save(logits[..., : cfg.vocab_size].clone(), op["out"])


def _weights(op: dict) -> None:
    """Every tensor of the model at op["checkpoint"] loaded on one rank (TP=1), saved."""
    from distill_llm.engine import parallel
    from distill_llm.engine.model import build_gpt
    from distill_llm.formats import paths

    cfg = paths.model_config_of(op["checkpoint"])
    parallel.initialize(parallel.ParallelConfig(), seed=5)
    model = build_gpt(cfg)
    paths.load_model(op["checkpoint"], model, cfg, role="model")
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    torch.save(state, op["out"])


def _attention_paths(op: dict) -> None:
    """Logits [b, s, V] (gathered) of one model built twice on op["tensor_parallel"] ranks, with
    SDPA and with megatron's unfused core attention, the same weights; rank 0 saves both."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from distill_llm.engine import parallel
    from distill_llm.engine.model import ModelConfig, build_gpt

    cfg = ModelConfig(**op["model"])
    tp = op.get("tensor_parallel", 1)
    parallel.initialize(parallel.ParallelConfig(tensor_parallel=tp), seed=17)
    sdpa, unfused = (
        build_gpt(cfg, tensor_parallel=tp),
        build_gpt(cfg, tensor_parallel=tp, attention="unfused"),
    )
    unfused.load_state_dict(sdpa.state_dict())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)
    positions = torch.arange(32).expand(2, 32)
    out = {}
    for name, model in (("sdpa", sdpa), ("unfused", unfused)):
        model.eval()
        with torch.no_grad():
            out[name] = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
    if parallel.is_main():
        torch.save(out, op["out"])


def _lm_loss(op: dict) -> None:
    """The per-token LM loss [b, s] the engine trains and validates on, for the model at
    op["checkpoint"] on op["tensor_parallel"] ranks: the plain GPT's (`pretrain`, `evaluate`'s
    model) or, with op["kd"] ("plain" or "fused"), the distillation wrapper's student; with
    op["with_grad"] (and "plain"), from a forward with grad whose KD loss then runs, and with
    "deferred" saying whether the KD loss wrote the LM loss."""
    from distill_llm.engine import parallel
    from distill_llm.engine.model import build_gpt
    from distill_llm.formats import paths
    from distill_llm.kd.config import KDConfig

    cfg = paths.model_config_of(op["checkpoint"])
    tp = op.get("tensor_parallel", 1)
    parallel.initialize(parallel.ParallelConfig(tensor_parallel=tp), seed=3)
    models = []
    for _ in range(2 if op.get("kd") else 1):
        models.append(build_gpt(cfg, tensor_parallel=tp))
        paths.load_model(op["checkpoint"], models[-1], cfg, role="model")
    model = models[0]
    if op.get("kd"):
        from distill_llm.kd import wrapper

        kd = KDConfig(fused_output_layer=op["kd"] == "fused")
        model = wrapper.build_distillation_model(models[0], models[1], kd)
    model.train(op.get("training", False))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    positions = torch.arange(16).expand(2, 16)
    deferred = False
    if op.get("kd") == "plain" and op.get("with_grad"):
        # a training forward with the default KD config: the logged LM loss is written by the
        # KD loss's chunks (wrapper._guarded_lm_loss), so the KD loss runs too
        per_token = model(tokens, positions, None, labels=labels)
        deferred = model.kd_criterion.lm_deferred
        wrapper.kd_loss_terms(model, per_token, torch.ones(2, 16))
        per_token = per_token.detach()
    else:
        with torch.no_grad():
            per_token = model(tokens, positions, None, labels=labels)
    if parallel.is_main():
        torch.save({"tokens": tokens, "labels": labels, "loss": per_token.clone(),
                    "deferred": deferred}, op["out"])  # fmt: skip


def main(spec_path: str) -> None:
    torch.set_num_threads(1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 2)
    spec = json.loads(open(spec_path).read())
    import distill_llm as dl

    _kill_hooks(spec.get("kill", {}))
    if spec.get("teacher_out"):
        _record_teacher(spec["teacher_out"])
    for op in spec["ops"]:
        kind = op.pop("op")
        local = {"logits": _logits, "lm_loss": _lm_loss, "weights": _weights,
                 "attention_paths": _attention_paths}  # fmt: skip
        if kind in local:
            local[kind](op)
            continue
        make = {
            "model": dl.ModelConfig,
            "student": dl.ModelConfig,
            "kd": dl.KDConfig,
            "data": dl.DataConfig,
            "train": dl.TrainConfig,
            "optim": dl.OptimConfig,
            "parallel": dl.ParallelConfig,
        }
        kwargs = {k: make[k](**v) if k in make and v is not None else v for k, v in op.items()}
        getattr(dl, kind)(**kwargs)


if __name__ == "__main__":
    main(sys.argv[1])
