"""MPT on ``hf_flexattn``: ALiBi from MPT's slopes (``alibi_bias_max=8``) as a ``score_mod``.

MPT adds ``slopes[h] * (j - (S - 1))`` for key ``j`` of ``S`` keys (independent of padding)
to ``q.k * softmax_scale``; its mask is boolean "masked" rather than "keep".
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from hf_flexattn.mods import alibi_slopes_mpt

from . import (
    FamilyPatch,
    packing_targets,
    pick_cache,
    refuse_dropout,
    wrap_attention_forward,
)

__all__ = ["Patch"]


def _mpt_alibi(slopes: torch.Tensor, kv_length: int):
    last = kv_length - 1

    def mpt_alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - last)

    return mpt_alibi


def _flex_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_bias: Any = None,
    attention_mask: Any = None,
    **kwargs: Any,
):
    from hf_flexattn.integrations.transformers import run_flex

    refuse_dropout(self.attn_dropout_p, self.training, "mpt")
    B, L = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (
        t.reshape(B, L, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2)
    )
    cache = pick_cache(kwargs)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    mods = []
    if position_bias is not None:
        mods.append(_mpt_alibi(alibi_slopes_mpt(self.n_heads, 8, device=q.device), k.shape[-2]))
    out = run_flex(q, k, v, attention_mask, mods, float(self.softmax_scale))
    context = out.transpose(1, 2).reshape(B, L, -1)
    return self.out_proj(context), None


_SAFE_CLASSES: dict[type, type] = {}


def _keep_on_dtype(block_mask: Any) -> Any:
    """A shallow copy of ``block_mask`` whose ``.to(dtype)`` is a no-op.

    ``MptModel`` calls ``create_causal_mask(...).to(torch.bool)``; on a BlockMask that would
    cast the block counts and indices to bool and destroy the mask.
    """
    cls = type(block_mask)
    safe = _SAFE_CLASSES.get(cls)
    if safe is None:

        def to(self, *args, **kwargs):
            target = args[0] if args else kwargs.get("device", kwargs.get("dtype"))
            if isinstance(target, torch.dtype):
                return self
            return cls.to(self, *args, **kwargs)

        safe = type(cls.__name__, (cls,), {"to": to, "__module__": cls.__module__})
        _SAFE_CLASSES[cls] = safe
    new = copy.copy(block_mask)
    new.__class__ = safe
    return new


def _wrap_create_causal_mask(orig: Any) -> Any:
    from torch.nn.attention.flex_attention import BlockMask

    @functools.wraps(orig)
    def create_causal_mask(*args, **kwargs):
        mask = orig(*args, **kwargs)
        return _keep_on_dtype(mask) if isinstance(mask, BlockMask) else mask

    create_causal_mask._hf_flexattn_original = orig  # type: ignore[attr-defined]
    return create_causal_mask


class Patch(FamilyPatch):
    """``MptAttention.forward`` (class level), MPT's mask-creation call site, and packed rows
    (see the package doc)."""

    model_type = "mpt"

    def _targets(self) -> list[tuple[Any, str, Any]]:
        from transformers.models.mpt import modeling_mpt as mm

        orig = mm.MptAttention.forward
        # the packed-document mask first, then the copy that survives .to(torch.bool)
        return [
            (mm.MptAttention, "forward", wrap_attention_forward(orig, _flex_forward)),
            *packing_targets(mm, "Mpt", self.names, mask_outer=_wrap_create_causal_mask),
        ]
