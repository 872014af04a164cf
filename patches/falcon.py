"""Falcon on ``hf_flexattn`` (ALiBi and rotary variants).

Falcon's SDPA path (the reference; its eager path adds ALiBi twice) adds
``bf16(bf16(slopes[h]) * pos(key)) / sqrt(head_dim)`` to ``q.k / sqrt(head_dim)``, with
``pos = (cumsum(attention_mask) - 1) * attention_mask``. Three hooks, all revertible:

* ``FALCON_ATTENTION_CLASSES[name] = FalconAttention``: model construction looks the
  implementation name up there and fails for unknown names;
* ``FalconAttention.forward``: flex path when it receives a BlockMask;
* ``FalconModel.forward``: under the flex implementation the model must not merge its ALiBi
  tensor into the mask (that merge expects a dense mask); ALiBi comes from the score_mod.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from hf_flexattn.mods import alibi_slopes_falcon

from . import (
    FamilyPatch,
    key_position_alibi,
    mask_key_positions,
    packing_targets,
    pick_cache,
    refuse_dropout,
    wrap_attention_forward,
    wrap_packing_forward,
)

__all__ = ["Patch"]


def _flex_forward(
    self: Any,
    hidden_states: torch.Tensor,
    alibi: Any = None,
    attention_mask: Any = None,
    position_ids: Any = None,
    position_embeddings: Any = None,
    **kwargs: Any,
):
    from transformers.models.falcon import modeling_falcon as mf

    from hf_flexattn.integrations.transformers import run_flex, select_mask

    refuse_dropout(self.attention_dropout.p, self.training, "falcon")
    num_kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    q, k, v = self._split_heads(self.query_key_value(hidden_states))
    B, L = q.shape[:2]
    q = q.transpose(1, 2).reshape(B, self.num_heads, L, self.head_dim)
    k = k.transpose(1, 2).reshape(B, num_kv_heads, L, self.head_dim)
    v = v.transpose(1, 2).reshape(B, num_kv_heads, L, self.head_dim)
    use_alibi = bool(self.config.alibi)
    if not use_alibi:
        cos, sin = position_embeddings
        q, k = mf.apply_rotary_pos_emb(q, k, cos, sin)
    cache = pick_cache(kwargs)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    block_mask, mods = select_mask(
        attention_mask, B, L, k.shape[-2], q.device, None, True, {"position_ids": position_ids}
    )
    if use_alibi:
        key_pos, kv_offset = mask_key_positions(attention_mask)
        slopes = alibi_slopes_falcon(self.num_heads, device=q.device)
        mods = [
            key_position_alibi(
                slopes,
                key_pos,
                kv_offset,
                bf16_product=True,
                divisor=math.sqrt(self.head_dim),
                out_dtype=q.dtype,
            )
        ] + mods
    out = run_flex(q, k, v, block_mask, mods, float(self.inv_norm_factor))
    out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
    return self.dense(out), None


def _wrap_model_forward(orig: Any, names: set[str]) -> Any:
    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        if not (self.use_alibi and self.config._attn_implementation in names):
            return orig(self, *args, **kwargs)
        # ALiBi is applied by the flex score_mod; keep the model from merging it into the mask
        self.use_alibi = False
        try:
            return orig(self, *args, **kwargs)
        finally:
            self.use_alibi = True

    forward._hf_flexattn_original = orig  # type: ignore[attr-defined]
    return forward


class Patch(FamilyPatch):
    """Falcon: class-map entry, attention forward and model forward."""

    model_type = "falcon"

    def __init__(self) -> None:
        super().__init__()
        self._added: list[str] = []

    def _targets(self) -> list[tuple[Any, str, Any]]:
        from transformers.models.falcon import modeling_falcon as mf

        attn = wrap_attention_forward(mf.FalconAttention.forward, _flex_forward)
        # packed rows (cu_seq_lens, which FalconForCausalLM drops) around the ALiBi switch
        model = wrap_packing_forward(
            _wrap_model_forward(mf.FalconModel.forward, self.names), self.names
        )
        return [
            (mf.FalconAttention, "forward", attn),
            (mf.FalconModel, "forward", model),
            *packing_targets(mf, "Falcon", self.names, skip=("FalconModel",)),
        ]

    def _extra_apply(self) -> None:
        from transformers.models.falcon import modeling_falcon as mf

        for name in self.names:
            if name not in mf.FALCON_ATTENTION_CLASSES:
                mf.FALCON_ATTENTION_CLASSES[name] = mf.FalconAttention
                self._added.append(name)

    def _extra_revert(self) -> None:
        from transformers.models.falcon import modeling_falcon as mf

        for name in self._added:
            mf.FALCON_ATTENTION_CLASSES.pop(name, None)
        self._added.clear()
