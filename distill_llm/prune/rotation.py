"""Hidden channels by principal components ("pca"): rotate the teacher's residual stream so its
first channels carry the most of it, then keep the first ones (Ashkboos et al. 2024,
"SliceGPT: Compress Large Language Models by Deleting Rows and Columns", arXiv 2401.15024,
with one rotation for the whole stream, so the result is a plain model of the pruned shape).

Why it is exact before the cut. An RMSNorm computes g * x / rms(x). Fold the weight g into the
linear layer that reads the norm's output (W <- W diag(g), g <- 1): the norm is then
x / rms(x), and for an orthogonal Q, rms(Q^T x) = rms(x). So with the stream carried as
x' = Q^T x, the model computes the same logits when every tensor that writes the stream is
multiplied by Q^T on its output side (word and position embeddings, `linear_proj` and
`linear_fc2` with their biases) and every tensor that reads it by Q on its input side
(`linear_qkv`, `linear_fc1`, the output layer, after their norm's weight is folded in).

The cut. Q's columns are the eigenvectors of C = sum over calibration tokens of u u^T, u the
unit direction of the stream where it is read (the inputs of the kept layers' two norms and of
the final norm, with the dropped layers passing their input through, as in the student), in
descending order of eigenvalue: keeping the first k channels keeps the k-dimensional subspace
that carries the largest share of those directions (`energy`). Each kept norm's weight is then
set by `plan.norm_scales` (measured on the rotated teacher), so that the root mean square over
k channels keeps the teacher's scale.

Needs RMSNorm (LayerNorm subtracts the mean, which a rotation does not commute with) and an
untied output layer (the final norm's weight is folded into it, not into the embedding);
`checks.check_prune` refuses the rest. Under tensor parallel the stream is whole on every rank
(no sequence parallel), so every rank computes the same C; the rotation is taken from rank 0
and applied to each rank's shards as they are (column-parallel weights hold every input
channel, row-parallel ones every output channel).
"""

import contextlib
import dataclasses
from typing import List, Sequence, Tuple

import torch

from distill_llm.engine.model import ModelConfig
from distill_llm.prune import importance
from distill_llm.prune.plan import kept_layers

ROTATION_FILE = "rotation.pt"  # Q `[h, h]` float32: teacher channel i -> rotated channel j


def _norm_sites(model, layer_index: int) -> List[Tuple[str, str, torch.nn.Module, bool]]:
    """Layer `layer_index`'s two norms, each as (norm weight name, the name of the linear weight
    that reads it, the module whose input is the stream there, hook before its forward?): for
    the local spec (separate norm modules: hook the norm's forward) and TransformerEngine's
    (norms fused into the linear layers: hook before the linear)."""
    layer = model.decoder.layers[layer_index]
    pre = f"decoder.layers.{layer_index}."
    sites = []
    for norm, linear in (
        ("input_layernorm", "self_attention.linear_qkv"),
        ("pre_mlp_layernorm", "mlp.linear_fc1"),
    ):
        reader = layer.get_submodule(linear)
        fused = getattr(reader, "layer_norm_weight", None) is not None
        weight = f"{pre}{linear}.layer_norm_weight" if fused else f"{pre}{norm}.weight"
        module = reader if fused else layer.get_submodule(norm)
        sites.append((weight, f"{pre}{linear}.weight", module, fused))
    return sites


@torch.no_grad()
def principal_axes(
    model, cfg: ModelConfig, batches: Sequence[dict], layers: Sequence[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Q `[h, h]`, eigenvalues `[h]`), both float64 and in descending order of eigenvalue, of
    the unit stream directions where the kept `layers` (teacher numbering) and the final norm
    read them, over this rank's calibration `batches` summed over data-parallel ranks, with
    every other layer passing its input through. The same on every rank (rank 0's); each
    eigenvector's largest component is positive, so the result does not depend on the sign
    eigh happens to return."""
    h = cfg.hidden_size
    device = next(model.parameters()).device
    cov = torch.zeros(h, h, dtype=torch.float64, device=device)

    def add(x: torch.Tensor) -> None:
        u = x.detach().double().reshape(-1, h)
        u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        cov.add_(u.T @ u)

    handles = []
    for i in layers:
        for _, _, module, before in _norm_sites(model, i):
            if before:
                handles.append(module.register_forward_pre_hook(lambda m, a: add(a[0])))
            else:
                handles.append(module.register_forward_hook(lambda m, a, out: add(a[0])))
    handles.append(model.decoder.final_layernorm.register_forward_hook(lambda m, a, o: add(a[0])))
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            for i in range(cfg.num_layers):
                if i not in layers:
                    stack.enter_context(importance.without_layer(model.decoder.layers[i]))
            importance.loss_sums(
                model, [{k: v.to(device) for k, v in b.items()} for b in batches], device
            )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    cov = importance.dp_sum(cov)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    peak = vectors.abs().argmax(dim=0)
    vectors = vectors * torch.sign(vectors[peak, torch.arange(h, device=device)])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(vectors, src=0)
        torch.distributed.broadcast(values, src=0)
    return vectors.cpu(), values.cpu()


def energy(values: torch.Tensor, k: int) -> float:
    """The share of the calibration directions' squared length that the first `k` channels
    keep (eigenvalues `values` in descending order)."""
    return float(values[:k].sum() / values.sum())


@torch.no_grad()
def rotate_(model, cfg: ModelConfig, q: torch.Tensor) -> None:
    """Fold every RMSNorm weight into the linear layer that reads it and rotate the residual
    stream of `model` (this rank's shard of a GPTModel of `cfg`) by `q` `[h, h]`, in place (see
    the module docstring). The logits are unchanged up to float rounding."""
    params = dict(model.named_parameters())
    q = q.double()

    def rewrite(name: str, fn) -> None:
        p = params[name]
        p.copy_(fn(p.detach().double()).to(p.dtype))

    def fold_and_read(norm: str, reader: str) -> None:
        g = params[norm].detach().double()
        rewrite(reader, lambda w: (w * g) @ q)
        params[norm].fill_(1.0)

    for i in range(cfg.num_layers):
        for norm, reader, _, _ in _norm_sites(model, i):
            fold_and_read(norm, reader)
        pre = f"decoder.layers.{i}."
        for writer in ("self_attention.linear_proj", "mlp.linear_fc2"):
            rewrite(f"{pre}{writer}.weight", lambda w: q.T @ w)
            if f"{pre}{writer}.bias" in params:
                rewrite(f"{pre}{writer}.bias", lambda b: q.T @ b)
    fold_and_read("decoder.final_layernorm.weight", "output_layer.weight")
    for name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight"):
        if name in params:
            rewrite(name, lambda e: e @ q)


def rotate_teacher(
    model,
    teacher: ModelConfig,
    student: ModelConfig,
    batches: Sequence[dict],
    scores: importance.Scores,
    depth_method: str,
) -> Tuple[importance.Scores, torch.Tensor]:
    """Rotate `model` (this rank's shard of `teacher`) onto the principal axes of the stream as
    the layers `student` keeps (by `scores` and `depth_method`) read it, in place, and return
    the scores for `plan.choose` with Q `[h, h]`: as hidden scores the variances of the
    rotated channels (descending: the first ones are kept), and the norms' inputs measured
    again on the rotated teacher (their factors, `plan.norm_scales`)."""
    layers = kept_layers(scores, teacher, student, depth_method)
    axes, variances = principal_axes(model, teacher, batches, layers)
    rotate_(model, teacher, axes)
    rotated = importance.collect(model, teacher, batches, depth_method, 0)
    scores = dataclasses.replace(scores, hidden=variances.float(), norm_inputs=rotated.norm_inputs)
    return scores, axes
