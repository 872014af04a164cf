"""Public ``flex_attention``: argument checks, defaults and backend choice.

Shapes follow :func:`torch.nn.attention.flex_attention.flex_attention`:
query ``[B, Hq, L, E]``, key ``[B, Hkv, S, E]``, value ``[B, Hkv, S, Ev]`` give
out ``[B, Hq, L, Ev]`` and, with ``return_lse=True``, lse ``[B, Hq, L]`` (fp32, natural log,
``-inf`` for rows that see nothing; their output is 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask as _TorchBlockMask

from ._mod_eval import check_mod_arity
from .kernels._render import env_reader, interpreter_on

__all__ = ["flex_attention", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# kernel_options understood by some backend; anything else is a typo worth reporting
_KNOWN_OPTIONS = {
    "backend", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages",
    "bwd_BLOCK_M", "bwd_BLOCK_N", "bwd_num_warps", "bwd_num_stages",
    "bwd_dq_BLOCK_M", "bwd_dq_BLOCK_N", "bwd_dq_num_warps", "bwd_dq_num_stages",
    "bwd_fused",
    "chunk_columns", "decode", "split_kv", "tma",
}


_ENV_BACKEND = env_reader("HF_FLEXATTN_BACKEND")


def resolve_backend(device: torch.device, kernel_options: dict[str, Any] | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``.

    Order: ``kernel_options["backend"]``, then ``HF_FLEXATTN_BACKEND``, then ``auto``
    (triton on CUDA, torch elsewhere).
    """
    choice = (kernel_options or {}).get("backend")
    source = 'kernel_options["backend"]'
    if choice is None:
        choice = _ENV_BACKEND() or "auto"
        source = "HF_FLEXATTN_BACKEND"
    if not isinstance(choice, str) or choice.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}.")
    choice = choice.lower()
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and not interpreter_on():
        raise ValueError(
            f"{source}='triton' needs CUDA tensors (got device {device}); on the CPU use "
            "backend='torch', or set TRITON_INTERPRET=1 to run the Triton kernels in "
            "Triton's interpreter (slow, for testing)."
        )
    return choice


@functools.lru_cache(maxsize=64)
def _full_block_mask(q_len: int, kv_len: int, device: torch.device,
                     block: tuple[int, int]) -> _TorchBlockMask:
    from .block_mask import BlockMask

    nq, nkv = -(-q_len // block[0]), -(-kv_len // block[1])
    zeros = torch.zeros(1, 1, nq, dtype=torch.int32, device=device)
    idx = torch.arange(nkv, dtype=torch.int32, device=device).expand(1, 1, nq, nkv)
    full = torch.full((1, 1, nq), nkv, dtype=torch.int32, device=device)
    from .block_mask import noop_mask

    return BlockMask.from_kv_blocks(
        zeros, idx.contiguous(), full, idx.contiguous(), BLOCK_SIZE=block,
        mask_mod=noop_mask, seq_lengths=(q_len, kv_len),
    )


def _check_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions [B, H, L, D], got shape {tuple(t.shape)}."
        )
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}."
        )
    return t


def _validate(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              score_mod: Callable | None, block_mask: Any, scale: Any, enable_gqa: bool,
              kernel_options: Any) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            "query, key and value must share one dtype, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}."
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            "query, key and value must be on one device, got "
            f"{query.device}, {key.device}, {value.device}."
        )
    B, Hq, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    Bv, Hv, Sv, Ev = value.shape
    if not (B == Bk == Bv):
        raise ValueError(
            f"batch sizes differ: query {B}, key {Bk}, value {Bv}; they must be equal."
        )
    if Hkv != Hv:
        raise ValueError(f"key has {Hkv} heads but value has {Hv}; they must be equal.")
    if S != Sv:
        raise ValueError(
            f"key has sequence length {S} but value has {Sv}; they must be equal."
        )
    if E != Ek:
        raise ValueError(
            f"query head dim {E} differs from key head dim {Ek}; they must be equal."
        )
    if min(B, Hq, Hkv, E, Ev) == 0:
        raise ValueError(
            f"empty dimension in query {tuple(query.shape)}, key {tuple(key.shape)} or "
            f"value {tuple(value.shape)}."
        )
    if Hq != Hkv:
        if Hq % Hkv != 0:
            raise ValueError(
                f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for "
                "grouped-query attention."
            )
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads but key/value have {Hkv}; pass enable_gqa=True for "
                "grouped-query attention."
            )
    if score_mod is not None:
        check_mod_arity(score_mod, 5, "score_mod")
    if block_mask is not None:
        if not isinstance(block_mask, _TorchBlockMask):
            raise TypeError(
                "block_mask must be a BlockMask (hf_flexattn.create_block_mask or "
                f"torch's), got {type(block_mask).__name__}."
            )
        seq = tuple(block_mask.seq_lengths)
        if seq != (L, S):
            raise ValueError(
                f"block_mask was built for (Q_LEN, KV_LEN) = {seq} but the inputs have "
                f"(L, S) = {(L, S)}; build the mask with the inputs' lengths."
            )
        if block_mask.kv_num_blocks.dim() != 3:
            raise ValueError(
                "block_mask must have batch and head dimensions (kv_num_blocks of shape "
                f"[B, H, n]), got {tuple(block_mask.kv_num_blocks.shape)}."
            )
        mb, mh = block_mask.kv_num_blocks.shape[:2]
        if mb not in (1, B):
            raise ValueError(f"block_mask batch size {mb} must be 1 or the input's {B}.")
        if mh not in (1, Hq):
            raise ValueError(
                f"block_mask head count {mh} must be 1 or the query head count {Hq}."
            )
        if block_mask.kv_num_blocks.device != query.device:
            raise ValueError(
                f"block_mask is on {block_mask.kv_num_blocks.device} but query is on "
                f"{query.device}; call block_mask.to({str(query.device)!r})."
            )
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}.")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}.")
    if kernel_options is not None:
        if not isinstance(kernel_options, dict):
            raise TypeError(
                f"kernel_options must be a dict or None, got {type(kernel_options).__name__}."
            )
        unknown = set(kernel_options) - _KNOWN_OPTIONS
        if unknown:
            raise ValueError(
                f"unknown kernel_options {sorted(unknown)}; known: {sorted(_KNOWN_OPTIONS)}."
            )


_AUTOCASTABLE = (torch.float32, torch.float16, torch.bfloat16)
# one C call, no device argument: keeps the check off the decoding path's cost (~0.1 us)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str | None]:
    """Inside ``torch.autocast`` for the query's device: q, k and v cast to the autocast
    dtype, as autocast does for SDPA (float64 is left alone), and that device type (the
    caller runs the kernel with autocast off). Outside autocast: unchanged and ``None``.

    Mixed-precision training needs this: under bf16 autocast with fp32 weights, rotary
    embeddings leave q and k in fp32 while v comes out of its projection in bf16."""
    if not _any_autocast() or not isinstance(query, torch.Tensor):
        return query, key, value, None
    dev = query.device.type
    if not torch.is_autocast_enabled(dev):
        return query, key, value, None
    dt = torch.get_autocast_dtype(dev)
    q, k, v = (
        t.to(dt) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCASTABLE else t
        for t in (query, key, value)
    )
    return q, k, v, dev


_PLAN_FNS: list = []


def _backend_fns() -> tuple[Callable, Callable]:
    """``(run_plan, may_have_plan)`` of the Triton backend, imported once (not on every
    decoding call)."""
    if not _PLAN_FNS:
        from .backends.triton_backend import may_have_plan, run_plan

        _PLAN_FNS.append((run_plan, may_have_plan))
    return _PLAN_FNS[0]


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask: _TorchBlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with a user ``score_mod`` and a block-sparse ``block_mask``.

    Args:
        query: ``[B, Hq, L, E]``. key: ``[B, Hkv, S, E]``. value: ``[B, Hkv, S, Ev]``.
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score``, torch scalar semantics.
        block_mask: a :class:`BlockMask` for ``(L, S)``; ``None`` attends everywhere.
        scale: multiplies ``q @ k^T`` before ``score_mod``; default ``1/sqrt(E)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv`` (q head h reads kv head
            ``h // (Hq // Hkv)``).
        return_lse: also return the log-sum-exp ``[B, Hq, L]`` (fp32, natural log).
        kernel_options: ``{"backend": "auto"|"triton"|"torch", ...}`` plus block-size
            overrides for the Triton kernels.

    Returns:
        ``out [B, Hq, L, Ev]`` in the input dtype, or ``(out, lse)``. Inside
        ``torch.autocast`` the inputs are first cast to the autocast dtype (as for SDPA).
    """
    query, key, value, autocast_device = autocast_inputs(query, key, value)
    if autocast_device is not None:
        with torch.autocast(autocast_device, enabled=False):
            return flex_attention(
                query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                kernel_options,
            )
    run_plan, may_have_plan = _backend_fns()
    if block_mask is not None and may_have_plan(block_mask):  # a decode plan may apply
        res = run_plan(
            query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, return_lse
        )
        if res is not None:  # a repeated decode call, validated when the plan was stored
            return res if return_lse else res[0]
    _validate(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options)
    kernel_options = dict(kernel_options or {})
    backend = resolve_backend(query.device, kernel_options)
    L, S = query.shape[-2], key.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if block_mask is None:
        block_mask = _full_block_mask(L, S, query.device, (128, 128))
    if backend == "torch":
        from .backends.torch_backend import flex_attention_forward
    else:
        from .backends.triton_backend import flex_attention_forward
    out, lse = flex_attention_forward(query, key, value, score_mod, block_mask, float(scale),
                                      kernel_options)
    if return_lse:
        return out, lse
    return out
