"""Core attention through `torch.nn.functional.scaled_dot_product_attention` for the local
(non-TransformerEngine) layer spec.

megatron-core's local `DotProductAttention` materialises the [b, heads, s, s] scores, runs a
separate masked softmax, then a second batched product; torch's SDPA does the same maths in
one fused kernel (flash / memory-efficient / math, whichever the device offers), which is what
transformers uses. `SDPAttention` keeps megatron's module (its config, softmax scale, per-TP-
rank head counts and checkpoint keys; it has no parameters) and replaces only the forward, for
the case the engine runs: causal, no explicit mask, no attention dropout while training, no
sliding window, no softmax offset. Any other call goes to megatron's own forward.

Unlike the rest of the engine this module imports megatron-core at the top (the class
subclasses megatron's); only `engine.model.layer_spec` imports it, inside the function.
"""

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """megatron's DotProductAttention with the causal, mask-free case run by torch's SDPA.

    query [sq, b, heads/TP, d], key and value [sk, b, groups/TP, d] -> context
    [sq, b, heads/TP x d]; query heads of one key/value group are contiguous (megatron's
    layout), which is what SDPA's `enable_gqa` pairs them by."""

    def _fast_path(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.attention_dropout.p if self.training else 0.0
        return (
            attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
            and mask_type == AttnMaskType.causal
            and dropout == 0.0
            and self.softmax_offset is None
            and self.config.window_size is None
        )

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """The context layer [sq, b, hp]; megatron's path for anything but plain causal."""
        if not self._fast_path(attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias,
                packed_seq_params,
            )  # fmt: skip
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
        # [b, h, sq, d] -> [sq, b, h x d]
        sq, b = context.shape[2], context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def use_sdpa(spec) -> None:
    """Point every layer of a local layer spec (or a block spec's layer specs) at SDPAttention."""
    layers = getattr(spec, "layer_specs", None) or [spec]
    for layer in layers:
        attention = layer.submodules.self_attention.submodules
        if attention.core_attention is DotProductAttention:
            attention.core_attention = SDPAttention
