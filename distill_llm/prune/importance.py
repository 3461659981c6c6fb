"""Minitron importance scores of a megatron-core GPTModel, from forward passes over calibration
batches (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation", arXiv 2407.14679; the aggregation is that of ModelOpt's `mcore_minitron` plugin).

Width. For an activation X `[s, b, C]` a hook sees, each channel c gets
    a_c = sum over the batch of (mean over the sequence of |X[:, :, c]|)^2,
summed over every calibration micro-batch (and data-parallel rank); at the end sqrt(a_c), i.e.
the L2 norm over all calibration sequences of the per-sequence mean magnitude.
  - attention heads: X = the input of `linear_proj` (core attention output, `[s, b, H*d]`);
    head j's score is the L2 norm of its d channel scores.
  - query groups: the L2 norm of their heads' scores (= of all their query channels' scores).
  - FFN neurons: X = the input of `linear_fc2` (after the activation / SwiGLU gating).
  - hidden (embedding) channels: X = the output of each layer's `input_layernorm` and
    `pre_mlp_layernorm`; sqrt per hook, then summed over the 2 x num_layers hooks.
Under tensor parallel each rank accumulates its own heads / neurons (the statistics are per
channel, so gathering them once at the end equals gathering every activation) and the scores
are all-gathered over the TP group: every rank gets the global scores, equal to TP=1's.

Depth, one score per layer, higher = more important:
  - "block_importance": 1 - cosine similarity of the layer's input and output hidden states,
    averaged over tokens (Men et al. 2024, "ShortGPT"), from the same forward passes;
  - "lm_loss": the LM loss on the calibration tokens with the layer removed (its output is its
    input); one more pass over the calibration batches per layer.
  - "iterative_lm_loss": layers removed one at a time, each time the one whose removal (with
    those already removed) gives the lowest calibration LM loss, until the student's depth is
    left (Song et al. 2024, "SLEB"). Ranking layers one at a time misses how removals combine:
    on the quickstart's teacher (4 layers, keep 2) the single-layer losses keep [0, 1], while
    the teacher without layers 1 and 3 has a 0.07-0.18 nats lower loss than without 2 and 3 on
    both seeds, and greedy removal finds it. A layer's score is the round it was removed in
    (0 = first), the kept layers' the number of rounds; removing D of L layers costs
    L + (L - 1) + ... + (L - D + 1) passes over the calibration batches.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from distill_llm.engine import parallel
from distill_llm.engine.model import ModelConfig

DEPTH_METHODS = ("lm_loss", "block_importance", "iterative_lm_loss")
# hidden channels: "activation" (Minitron's scores above) or "pca" (principal components of
# the rotated residual stream, `prune.rotation`)
HIDDEN_METHODS = ("activation", "pca")


@dataclass
class Scores:
    """A teacher's importance scores (all float32, on the CPU, the same on every rank)."""

    hidden: torch.Tensor  # [hidden_size]
    heads: torch.Tensor  # [num_layers, num_attention_heads]
    ffn: torch.Tensor  # [num_layers, ffn_hidden_size]
    block_importance: torch.Tensor  # [num_layers]: 1 - cos(input, output), token mean
    lm_loss: Optional[torch.Tensor]  # [num_layers]: LM loss without the layer (None: not run)
    calibration_loss: float  # the teacher's LM loss on the calibration tokens
    # [2 x num_layers + 1, hidden_size]: sum over the calibration tokens of the squared input
    # of each norm (input_layernorm, pre_mlp_layernorm per layer, then final_layernorm)
    norm_inputs: Optional[torch.Tensor] = None
    # "iterative_lm_loss": [num_layers] removal round per layer (kept: the number of rounds),
    # and [(layer, LM loss once it and those before it are removed)] in removal order
    iterative: Optional[torch.Tensor] = None
    removals: Optional[List[Tuple[int, float]]] = None

    def groups(self, cfg: ModelConfig) -> torch.Tensor:
        """Query-group scores `[num_layers, num_query_groups]`: the L2 norm of their heads'."""
        per_group = cfg.num_attention_heads // cfg.query_groups
        return self.heads.view(cfg.num_layers, cfg.query_groups, per_group).norm(dim=-1)

    def layers(self, depth_method: str) -> torch.Tensor:
        """The depth scores `[num_layers]` of `depth_method` (one of DEPTH_METHODS)."""
        if depth_method == "iterative_lm_loss":
            return self.iterative
        return self.lm_loss if depth_method == "lm_loss" else self.block_importance


def _channel_sums(x: torch.Tensor) -> torch.Tensor:
    """`[s, b, C]` -> `[C]`: sum over the batch of (mean over the sequence of |x|)^2."""
    return x.detach().float().abs().mean(dim=0).pow(2).sum(dim=0)


class _Recorder:
    """Forward hooks accumulating the width statistics and block importance of every layer."""

    def __init__(self, model, cfg: ModelConfig, device):
        # on the model's device: no host sync per hook, and NCCL gathers them as they are
        self.hidden = torch.zeros(2 * cfg.num_layers, cfg.hidden_size, device=device)
        self.heads: List[Optional[torch.Tensor]] = [None] * cfg.num_layers
        self.ffn: List[Optional[torch.Tensor]] = [None] * cfg.num_layers
        self.block = torch.zeros(cfg.num_layers, device=device)
        self.norm_inputs = torch.zeros(2 * cfg.num_layers + 1, cfg.hidden_size, device=device)
        self.handles = []
        for i, layer in enumerate(model.decoder.layers):
            pairs = (
                (layer.input_layernorm, layer.self_attention.linear_qkv),
                (layer.pre_mlp_layernorm, layer.mlp.linear_fc1),
            )
            for k, (norm, linear) in enumerate(pairs):
                if getattr(linear, "layer_norm_weight", None) is not None:
                    # TransformerEngine fuses the norm into the next linear layer
                    fused = self._add_fused_norm(2 * i + k, cfg)
                    self.handles.append(linear.register_forward_pre_hook(fused))
                else:
                    self._hook(norm, self._add_hidden(2 * i + k))
            self._hook(layer.self_attention.linear_proj, self._add_input(self.heads, i))
            self._hook(layer.mlp.linear_fc2, self._add_input(self.ffn, i))
            self.handles.append(layer.register_forward_hook(self._add_block(i), with_kwargs=True))
        final = getattr(model.decoder, "final_layernorm", None)
        if final is not None:
            self._hook(final, self._add_norm_input(2 * cfg.num_layers))

    def _hook(self, module, fn) -> None:
        self.handles.append(module.register_forward_hook(fn))

    def _add_norm_input(self, slot: int):
        def hook(module, args, output):
            self.norm_inputs[slot] += args[0].detach().float().pow(2).sum(dim=(0, 1))

        return hook

    def _add_hidden(self, slot: int):
        """One hook per norm: its output's channel statistics and its input's squares."""
        norm_input = self._add_norm_input(slot)

        def hook(module, args, output):
            self.hidden[slot] += _channel_sums(output)
            norm_input(module, args, output)

        return hook

    def _add_fused_norm(self, slot: int, cfg: ModelConfig):
        def hook(module, args):
            x = args[0].float()
            self.norm_inputs[slot] += x.pow(2).sum(dim=(0, 1))
            weight = module.layer_norm_weight.float()
            bias = getattr(module, "layer_norm_bias", None)
            if cfg.normalization == "RMSNorm":
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon) * weight
            else:
                bias = None if bias is None else bias.float()
                y = F.layer_norm(x, (x.shape[-1],), weight, bias, cfg.norm_epsilon)
            self.hidden[slot] += _channel_sums(y)

        return hook

    @staticmethod
    def _add_input(store: list, i: int):
        def hook(module, args, output):
            sums = _channel_sums(args[0])
            store[i] = sums if store[i] is None else store[i] + sums

        return hook

    def _add_block(self, i: int):
        def hook(module, args, kwargs, output):
            before = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos = F.cosine_similarity(before.float(), output[0].float(), dim=-1)  # [s, b]
            self.block[i] += (1 - cos).mean()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def without_layer(layer):
    """`layer` passes its input through (its output is its input) inside the block."""

    def identity(*args, hidden_states=None, context=None, **kwargs):
        return (args[0] if hidden_states is None else hidden_states), context

    layer.forward = identity
    try:
        yield
    finally:
        del layer.forward


def loss_sums(model, batches: List[dict], device) -> torch.Tensor:
    """[LM loss summed over the calibration tokens, their number] on this rank."""
    total = torch.zeros(2, device=device)
    for batch in batches:
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        mask = batch["loss_mask"].to(per_token.device).float()
        total += torch.stack([(per_token.float() * mask).sum(), mask.sum()])
    return total


def greedy_removal(
    loss_without: Callable[[Sequence[int]], float], num_layers: int, drop: int
) -> List[Tuple[int, float]]:
    """Remove `drop` of `num_layers` layers one at a time (SLEB): each round, of the layers
    left, the one for which `loss_without(removed + [layer])` is lowest (ties: the lower
    index). Returns [(layer, that loss)] in removal order."""
    removed: List[Tuple[int, float]] = []
    for _ in range(drop):
        gone = [layer for layer, _ in removed]
        trials = [(loss_without(gone + [i]), i) for i in range(num_layers) if i not in gone]
        loss, layer = min(trials)
        removed.append((layer, loss))
    return removed


def _iterative(model, batches: List[dict], device, num_layers: int, drop: int, bar):
    """The "iterative_lm_loss" scores `[num_layers]` and removals of `greedy_removal` on the
    calibration LM loss, summed over data-parallel ranks (so every rank decides alike)."""

    def loss_without(layers: Sequence[int]) -> float:
        with contextlib.ExitStack() as stack:
            for i in layers:
                stack.enter_context(without_layer(model.decoder.layers[i]))
            total = dp_sum(loss_sums(model, batches, device)).cpu()
        if bar is not None:
            bar.update(len(batches))
        return float(total[0] / total[1])

    removals = greedy_removal(loss_without, num_layers, drop)
    scores = torch.full((num_layers,), float(drop))
    for round_, (layer, _) in enumerate(removals):
        scores[layer] = float(round_)
    return scores, removals


def dp_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the data-parallel ranks (every rank gets the sum)."""
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_world_size() > 1:
        t = t.contiguous()
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t


def _tp_gather(t: torch.Tensor) -> torch.Tensor:
    """`[..., C/TP]` per TP rank -> `[..., C]` in rank order, on every rank of the TP group."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    group = parallel_state.get_tensor_model_parallel_group()
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _progress(total: int):
    if not parallel.is_main():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="calibration", unit="batch", mininterval=2.0)


@torch.no_grad()
def collect(
    model, cfg: ModelConfig, batches: Iterable[dict], depth_method: str, drop: int
) -> Scores:
    """The importance scores of `model` (this rank's GPTModel shard of `cfg`, pipeline parallel
    1) over this rank's calibration micro-batches `batches` (dicts of `[b, s]` tokens, labels,
    loss_mask, position_ids). The LM-loss depth passes run only when `drop` (the number of
    layers the student loses) is positive."""
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    extra = 0
    if drop > 0 and depth_method == "lm_loss":
        extra = cfg.num_layers
    elif drop > 0 and depth_method == "iterative_lm_loss":
        extra = sum(cfg.num_layers - r for r in range(drop))
    bar = _progress(len(batches) * (1 + extra))
    was_training = model.training
    model.eval()
    recorder = _Recorder(model, cfg, device)
    try:
        base = loss_sums(model, batches, device)
    finally:
        recorder.remove()
    if bar is not None:
        bar.update(len(batches))
    without = iterative = removals = None
    if extra and depth_method == "iterative_lm_loss":
        iterative, removals = _iterative(model, batches, device, cfg.num_layers, drop, bar)
    elif extra:
        without = torch.zeros(cfg.num_layers, 2, device=device)
        for i, layer in enumerate(model.decoder.layers):
            with without_layer(layer):
                without[i] = loss_sums(model, batches, device)
            if bar is not None:
                bar.update(len(batches))
    if bar is not None:
        bar.close()
    model.train(was_training)
    count = dp_sum(torch.tensor([float(len(batches))], device=device))
    base = dp_sum(base).cpu()
    heads = dp_sum(_tp_gather(torch.stack(recorder.heads))).cpu()
    heads = heads.sqrt().view(cfg.num_layers, cfg.num_attention_heads, cfg.head_dim).norm(dim=-1)
    lm_loss = None
    if without is not None:
        without = dp_sum(without).cpu()
        lm_loss = without[:, 0] / without[:, 1]
    return Scores(
        hidden=dp_sum(recorder.hidden).cpu().sqrt().sum(dim=0),
        heads=heads,
        ffn=dp_sum(_tp_gather(torch.stack(recorder.ffn))).cpu().sqrt(),
        block_importance=(dp_sum(recorder.block) / count).cpu(),
        lm_loss=lm_loss,
        calibration_loss=float(base[0] / base[1]),
        norm_inputs=dp_sum(recorder.norm_inputs).cpu(),
        iterative=iterative,
        removals=removals,
    )
