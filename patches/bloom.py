"""Bloom on ``hf_flexattn``: ALiBi from Bloom's slopes and padding-aware key positions.

Bloom adds ``slopes[h] * pos(key)`` to ``q.k / sqrt(d)``, where ``pos`` is
``(cumsum(attention_mask) - 1) * attention_mask`` (the key's index among the row's real
tokens; in a packed row, its index within its document). Here it is a ``score_mod`` reading
those ``[B, S]`` positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hf_flexattn.mods import alibi_slopes_bloom

from . import (
    FamilyPatch,
    key_position_alibi,
    mask_key_positions,
    packing_targets,
    pick_cache,
    refuse_dropout,
    wrap_attention_forward,
)

__all__ = ["Patch"]


def _flex_forward(
    self: Any,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: Any = None,
    attention_mask: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: Any,
):
    from transformers.models.bloom import modeling_bloom as mb

    from hf_flexattn.integrations.transformers import run_flex

    refuse_dropout(self.attention_dropout.p, self.training, "bloom")
    B, L, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))  # [B, H, L, D] each
    cache = pick_cache(kwargs)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    key_pos, kv_offset = mask_key_positions(attention_mask)
    slopes = alibi_slopes_bloom(self.num_heads, device=q.device)
    mod = key_position_alibi(slopes, key_pos, kv_offset, out_dtype=q.dtype)
    out = run_flex(q, k, v, attention_mask, [mod], float(self.inv_norm_factor))
    context = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
    if self.pretraining_tp > 1 and self.slow_but_exact:
        slices = self.hidden_size / self.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            lo, hi = int(i * slices), int((i + 1) * slices)
            output = output + F.linear(context[:, :, lo:hi], self.dense.weight[:, lo:hi])
    else:
        output = self.dense(context)
    output = mb.dropout_add(output, residual, self.hidden_dropout, self.training)
    return output, None


class Patch(FamilyPatch):
    """Class-level wrap of ``BloomAttention.forward``; packed rows (see the package doc)."""

    model_type = "bloom"

    def _targets(self) -> list[tuple[Any, str, Any]]:
        from transformers.models.bloom import modeling_bloom as mb

        orig = mb.BloomAttention.forward
        return [
            (mb.BloomAttention, "forward", wrap_attention_forward(orig, _flex_forward)),
            *packing_targets(mb, "Bloom", self.names),
        ]
