"""Bloom on ``hf_flexattn``: ALiBi from Bloom's slopes and padding-aware key positions.

Bloom adds ``slopes[h] * pos(key)`` to ``q.k / sqrt(d)``, where ``pos`` is
``(cumsum(attention_mask) - 1) * attention_mask`` (the key's index among the row's real
tokens). Here it is a ``score_mod`` reading those ``[B, S]`` positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from . import (
    FamilyPatch,
    key_position_alibi,
    mask_key_positions,
    pick_cache,
    refuse_dropout,
    wrap_attention_forward,
)

__all__ = ["Patch", "bloom_alibi_slopes"]


def bloom_alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bloom's ALiBi slopes ``[num_heads]`` (fp32), bit-identical to the model's."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}.")
    p2 = 2 ** math.floor(math.log2(num_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(p2) - 3))), device=device, dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + p2, device=device, dtype=torch.int32))
    if p2 != num_heads:
        extra_base = torch.full(
            (), 2 ** (-(2 ** -(math.log2(2 * p2) - 3))), device=device, dtype=torch.float32
        )
        n_extra = min(p2, num_heads - p2)
        odd = torch.arange(1, 1 + 2 * n_extra, 2, device=device, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, odd)])
    return slopes


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
    slopes = bloom_alibi_slopes(self.num_heads, q.device)
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
    """Class-level wrap of ``BloomAttention.forward``."""

    model_type = "bloom"

    def _targets(self) -> list[tuple[Any, str, Any]]:
        from transformers.models.bloom import modeling_bloom as mb

        orig = mb.BloomAttention.forward
        return [(mb.BloomAttention, "forward", wrap_attention_forward(orig, _flex_forward))]
