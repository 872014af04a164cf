"""Blockwise PyTorch backend: works on any device, honours the BlockMask, full autograd.

The forward walks q-blocks of ``Q_BLOCK`` rows (from ``block_mask.BLOCK_SIZE``). For each
q-block it takes the union over ``(b, h)`` of the kv blocks the mask lists as partial or
full, and processes them in chunks of gathered K/V columns, vectorised over batch and
heads, with an fp32 online softmax. No ``L x S`` score matrix is ever built.

Per tile and ``(b, h)`` the mask state is *full* (allowed, ``mask_mod`` skipped),
*partial* (``mask_mod`` decides) or *empty* (not allowed); positions past ``L``/``S`` are
never visited. ``mask_mod`` is evaluated only on tiles that are partial for some
``(b, h)``. ``score_mod`` runs on the raw scaled scores before masking.

The backward recomputes each tile (flash-attention style) from the saved ``lse`` and
differentiates ``score_mod`` with :func:`torch.autograd.grad` on the tile, which also
routes gradients to tensors captured by ``score_mod`` that require grad.

Accumulation is fp32 (fp64 for fp64 inputs); the returned ``lse`` is natural-log and fp32
(fp64 for fp64 inputs, as torch's flex_attention); rows that see nothing give output 0,
lse ``-inf`` and zero gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .._mod_eval import eval_mask_mod, eval_score_mod, find_captured_tensors

__all__ = ["flex_attention_forward"]

_logger = logging.getLogger(__name__)

_EMPTY, _PARTIAL, _FULL = 0, 1, 2
# default bound on the gathered columns per chunk, and on B*Hq*M*N elements of one tile
_DEFAULT_CHUNK_COLUMNS = 2048
_TILE_ELEMENTS = 1 << 23


@dataclass
class _Chunk:
    """A run of kv blocks for one q-block, as gathered columns."""

    cols: torch.Tensor  # [N] int64 kv positions (on the device)
    span: tuple[int, int] | None  # (start, stop) when the columns are contiguous
    col_state: torch.Tensor  # [Bm, Hm, N] int8 tile state of each column
    part_local: torch.Tensor | None  # [Np] int64 positions within the chunk to run mask_mod on
    all_partial: bool  # every column belongs to a tile partial for some (b, h)


@dataclass
class _Plan:
    """The tile walk shared by forward and backward."""

    q_block: int
    kv_block: int
    rows: list[tuple[int, int]]  # per q-block (start, stop)
    chunks: list[list[_Chunk]]  # per q-block


def _tile_state(block_mask: Any, n_q: int, n_kv: int) -> torch.Tensor:
    """Dense tile state ``[Bm, Hm, n_q, n_kv]`` int8 from the BlockMask index lists."""
    kv_num = block_mask.kv_num_blocks
    Bm, Hm = kv_num.shape[:2]
    if kv_num.shape[-1] < n_q:
        raise ValueError(
            f"block_mask has {kv_num.shape[-1]} q-blocks but the query needs {n_q} "
            f"(Q_LEN / Q_BLOCK); build the mask for the inputs' lengths."
        )
    device = kv_num.device
    state = torch.zeros(Bm, Hm, n_q, n_kv + 1, dtype=torch.int8, device=device)

    def scatter(num: torch.Tensor | None, idx: torch.Tensor | None, value: int) -> None:
        if num is None or idx is None:
            return
        num = num[..., :n_q].long()
        idx = idx[..., :n_q, :].long()
        pos = torch.arange(idx.shape[-1], device=device)
        valid = (pos < num[..., None]) & (idx >= 0) & (idx < n_kv)
        target = torch.where(valid, idx, torch.full_like(idx, n_kv))
        src = torch.full(target.shape, value, dtype=torch.int8, device=device)
        state.scatter_(-1, target, src)

    scatter(kv_num, block_mask.kv_indices, _PARTIAL)
    scatter(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, _FULL)
    return state[..., :n_kv]


def _make_plan(
    block_mask: Any, L: int, S: int, B: int, Hq: int, device: torch.device, kernel_options: dict
) -> _Plan:
    bs = block_mask.BLOCK_SIZE
    q_block, kv_block = (int(bs), int(bs)) if isinstance(bs, int) else (int(x) for x in bs)
    n_q, n_kv = -(-L // q_block), -(-S // kv_block)
    state = _tile_state(block_mask, n_q, n_kv).to(device)
    state_cpu = state.cpu()
    active = (state_cpu != _EMPTY).flatten(0, 1).any(0).tolist()  # [n_q][n_kv]
    partial_any = (state_cpu == _PARTIAL).flatten(0, 1).any(0).tolist()

    max_cols = int(kernel_options.get("chunk_columns") or _DEFAULT_CHUNK_COLUMNS)
    rows, chunks = [], []
    for i in range(n_q):
        r0, r1 = i * q_block, min((i + 1) * q_block, L)
        rows.append((r0, r1))
        budget = max(kv_block, min(max_cols, _TILE_ELEMENTS // max(1, B * Hq * (r1 - r0))))
        per_chunk = max(1, budget // kv_block)
        blocks = [j for j in range(n_kv) if active[i][j]]
        q_chunks = []
        for c in range(0, len(blocks), per_chunk):
            q_chunks.append(
                _build_chunk(
                    blocks[c : c + per_chunk], partial_any[i], state[:, :, i], kv_block, S, device
                )
            )
        chunks.append(q_chunks)
    return _Plan(q_block, kv_block, rows, chunks)


def _build_chunk(
    blocks: list[int],
    partial_row: list[bool],
    state_row: torch.Tensor,
    kv_block: int,
    S: int,
    device: torch.device,
) -> _Chunk:
    starts = [j * kv_block for j in blocks]
    stops = [min(S, s + kv_block) for s in starts]
    contiguous = all(stops[t] == starts[t + 1] for t in range(len(blocks) - 1))
    if contiguous:
        span = (starts[0], stops[-1])
        cols = torch.arange(span[0], span[1], device=device)
    else:
        span = None
        cols = torch.cat([torch.arange(a, b) for a, b in zip(starts, stops)]).to(device)
    col_state = state_row.index_select(-1, cols // kv_block)
    local, n_part, off = [], 0, 0
    for j, a, b in zip(blocks, starts, stops):
        if partial_row[j]:
            local.append((off, off + b - a))
            n_part += b - a
        off += b - a
    all_partial = n_part == off
    part_local = None
    if n_part and not all_partial:
        part_local = torch.cat([torch.arange(a, b) for a, b in local]).to(device)
    return _Chunk(cols, span, col_state, part_local, all_partial and n_part > 0)


def _gather(t: torch.Tensor, chunk: _Chunk, dtype: torch.dtype) -> torch.Tensor:
    """Columns of ``t [B, Hkv, S, D]`` for a chunk, as ``dtype``."""
    if chunk.span is not None:
        sub = t[:, :, chunk.span[0] : chunk.span[1]]
    else:
        sub = t.index_select(2, chunk.cols)
    return sub.to(dtype)


def _allowed(
    chunk: _Chunk,
    mask_mod: Callable | None,
    bvec: torch.Tensor,
    hvec: torch.Tensor,
    qrows: torch.Tensor,
) -> torch.Tensor:
    """Bool mask broadcastable to ``[B, Hq, M, N]`` for one chunk."""
    st = chunk.col_state[:, :, None, :]  # [Bm, Hm, 1, N]
    full = st == _FULL
    if chunk.part_local is None and not chunk.all_partial:
        return full
    if chunk.all_partial:
        mm = (
            torch.ones((), dtype=torch.bool, device=full.device)
            if mask_mod is None
            else eval_mask_mod(mask_mod, bvec, hvec, qrows, chunk.cols)
        )
        return full | ((st == _PARTIAL) & mm)
    idx = chunk.part_local
    mm = (
        torch.ones((), dtype=torch.bool, device=full.device)
        if mask_mod is None
        else eval_mask_mod(mask_mod, bvec, hvec, qrows, chunk.cols[idx])
    )
    allowed = full.expand(bvec.numel(), hvec.numel(), qrows.numel(), -1).clone()
    allowed[..., idx] |= (st[..., idx] == _PARTIAL) & mm
    return allowed


def _scores(
    q2: torch.Tensor,
    kc: torch.Tensor,
    scale: float,
    score_mod: Callable | None,
    B: int,
    Hq: int,
    M: int,
    bvec: torch.Tensor,
    hvec: torch.Tensor,
    qrows: torch.Tensor,
    cols: torch.Tensor,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scaled scores and score_mod output, both ``[B, Hq, M, N]`` in ``acc``."""
    raw = torch.matmul(q2, kc.transpose(-1, -2)).mul_(scale).view(B, Hq, M, -1)
    if score_mod is None:
        return raw, raw
    mod = eval_score_mod(score_mod, raw, bvec, hvec, qrows, cols).to(acc)
    return raw, mod


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable | None,
    mask_mod: Callable | None,
    plan: _Plan,
    scale: float,
    keep_acc_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns out (query dtype), lse (acc dtype) and, if ``keep_acc_out``, out in the
    accumulation dtype (used for the backward's ``delta``; else the same tensor as out)."""
    B, Hq, L, E = q.shape
    Hkv, Ev = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    dev = q.device
    out = torch.zeros(B, Hq, L, Ev, dtype=q.dtype, device=dev)
    out_acc = (
        torch.zeros(B, Hq, L, Ev, dtype=acc, device=dev) if keep_acc_out and acc != q.dtype else out
    )
    lse = torch.full((B, Hq, L), float("-inf"), dtype=acc, device=dev)
    bvec = torch.arange(B, device=dev)
    hvec = torch.arange(Hq, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=dev)
    for (r0, r1), chunks in zip(plan.rows, plan.chunks):
        if not chunks:
            continue
        M = r1 - r0
        qrows = torch.arange(r0, r1, device=dev)
        q2 = q[:, :, r0:r1].to(acc).reshape(B, Hkv, G * M, E)
        m_i = torch.full((B, Hq, M), float("-inf"), dtype=acc, device=dev)
        l_i = torch.zeros(B, Hq, M, dtype=acc, device=dev)
        o_i = torch.zeros(B, Hkv, G * M, Ev, dtype=acc, device=dev)
        for ch in chunks:
            kc = _gather(k, ch, acc)
            _, s = _scores(q2, kc, scale, score_mod, B, Hq, M, bvec, hvec, qrows, ch.cols, acc)
            s = torch.where(_allowed(ch, mask_mod, bvec, hvec, qrows), s, neg_inf)
            m_new = torch.maximum(m_i, s.amax(-1))
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            vc = _gather(v, ch, acc)
            o_i = o_i * alpha.view(B, Hkv, G * M, 1) + torch.matmul(p.view(B, Hkv, G * M, -1), vc)
            m_i = m_new
        seen = l_i > 0
        l_safe = torch.where(seen, l_i, torch.ones_like(l_i))
        o_i = o_i.view(B, Hq, M, Ev) / l_safe[..., None]
        out[:, :, r0:r1] = o_i.to(q.dtype)
        if out_acc is not out:
            out_acc[:, :, r0:r1] = o_i
        m_fin = torch.where(seen, m_i, torch.zeros_like(m_i))
        lse[:, :, r0:r1] = torch.where(seen, m_fin + torch.log(l_safe), neg_inf)
    return out, lse, out_acc


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    d_lse: torch.Tensor | None,
    score_mod: Callable | None,
    mask_mod: Callable | None,
    plan: _Plan,
    scale: float,
    caps: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    dev = q.device
    dq = torch.zeros(B, Hq, L, E, dtype=acc, device=dev)
    dk = torch.zeros(B, Hkv, S, E, dtype=acc, device=dev)
    dv = torch.zeros(B, Hkv, S, Ev, dtype=acc, device=dev)
    dcaps: list[torch.Tensor | None] = [None] * len(caps)
    bvec = torch.arange(B, device=dev)
    hvec = torch.arange(Hq, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=dev)
    zero = torch.zeros((), dtype=acc, device=dev)
    for (r0, r1), chunks in zip(plan.rows, plan.chunks):
        if not chunks:
            continue
        M = r1 - r0
        qrows = torch.arange(r0, r1, device=dev)
        q2 = q[:, :, r0:r1].to(acc).reshape(B, Hkv, G * M, E)
        do2 = d_out[:, :, r0:r1].to(acc).reshape(B, Hkv, G * M, Ev)
        lse_i = lse[:, :, r0:r1].to(acc)
        lse_i = torch.where(torch.isneginf(lse_i), torch.zeros_like(lse_i), lse_i)
        delta = (d_out[:, :, r0:r1].to(acc) * out[:, :, r0:r1].to(acc)).sum(-1)
        if d_lse is not None:
            delta = delta - d_lse[:, :, r0:r1].to(acc)
        dq_i = torch.zeros(B, Hkv, G * M, E, dtype=acc, device=dev)
        for ch in chunks:
            kc = _gather(k, ch, acc)
            vc = _gather(v, ch, acc)
            allowed = _allowed(ch, mask_mod, bvec, hvec, qrows)
            need_mod_grad = score_mod is not None
            if need_mod_grad:
                raw = torch.matmul(q2, kc.transpose(-1, -2)).mul_(scale).view(B, Hq, M, -1)
                raw_leaf = raw.detach().requires_grad_(True)
                with torch.enable_grad():
                    s_mod = eval_score_mod(score_mod, raw_leaf, bvec, hvec, qrows, ch.cols)
                s = torch.where(allowed, s_mod.detach().to(acc), neg_inf)
            else:
                _, s = _scores(q2, kc, scale, None, B, Hq, M, bvec, hvec, qrows, ch.cols, acc)
                s = torch.where(allowed, s, neg_inf)
            p = torch.exp(s - lse_i[..., None])  # [B, Hq, M, N]; 0 where masked
            p2 = p.view(B, Hkv, G * M, -1)
            dvc = torch.matmul(p2.transpose(-1, -2), do2)
            dp = torch.matmul(do2, vc.transpose(-1, -2)).view(B, Hq, M, -1)
            ds = p * (dp - delta[..., None])
            ds = torch.where(allowed, ds, zero)
            if need_mod_grad:
                ds_raw, dcap_tile = _score_mod_grad(s_mod, raw_leaf, caps, ds)
                ds_raw = torch.where(allowed, ds_raw, zero)
                for t, g in enumerate(dcap_tile):
                    if g is not None:
                        dcaps[t] = g if dcaps[t] is None else dcaps[t] + g
            else:
                ds_raw = ds
            ds2 = ds_raw.reshape(B, Hkv, G * M, -1)
            dq_i += torch.matmul(ds2, kc)
            dkc = torch.matmul(ds2.transpose(-1, -2), q2)
            if ch.span is not None:
                a, b = ch.span
                dk[:, :, a:b] += dkc
                dv[:, :, a:b] += dvc
            else:
                dk.index_add_(2, ch.cols, dkc)
                dv.index_add_(2, ch.cols, dvc)
        dq[:, :, r0:r1] = dq_i.view(B, Hq, M, E)
    dq.mul_(scale)
    dk.mul_(scale)
    return dq, dk, dv, dcaps


def _score_mod_grad(
    s_mod: torch.Tensor, raw_leaf: torch.Tensor, caps: list[torch.Tensor], ds: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Pull ``ds`` (grad w.r.t. the modded score) back to the raw score and captures."""
    if not s_mod.requires_grad:
        return torch.zeros_like(ds), [None] * len(caps)
    inputs = [raw_leaf] + list(caps)
    grads = torch.autograd.grad(s_mod, inputs, grad_outputs=ds.to(s_mod.dtype), allow_unused=True)
    g_raw = grads[0]
    g_raw = torch.zeros_like(ds) if g_raw is None else g_raw.to(ds.dtype)
    return g_raw, list(grads[1:])


class _FlexAttentionTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, score_mod, mask_mod, plan, scale, *caps):
        out, lse, out_acc = _forward(q, k, v, score_mod, mask_mod, plan, scale, keep_acc_out=True)
        # delta = rowsum(dO * out) uses the unrounded output: better low-precision grads
        ctx.save_for_backward(q, k, v, out_acc, lse)
        ctx.score_mod, ctx.mask_mod, ctx.plan, ctx.scale = score_mod, mask_mod, plan, scale
        ctx.caps = caps
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(out)
        with torch.autocast(q.device.type, enabled=False):  # the forward ran without it
            dq, dk, dv, dcaps = _backward(
                q, k, v, out, lse, d_out, d_lse, ctx.score_mod, ctx.mask_mod, ctx.plan,
                ctx.scale, list(ctx.caps),
            )
        ncap = ctx.needs_input_grad[7:]
        cap_grads = []
        for c, g, need in zip(ctx.caps, dcaps, ncap):
            if not need:
                cap_grads.append(None)
            elif g is None:
                cap_grads.append(torch.zeros_like(c))
            else:
                cap_grads.append(g.to(c.dtype))
        return (
            dq.to(q.dtype) if ctx.needs_input_grad[0] else None,
            dk.to(k.dtype) if ctx.needs_input_grad[1] else None,
            dv.to(v.dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
            *cap_grads,
        )


def flex_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None,
    block_mask: Any,
    scale: float,
    kernel_options: dict | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise attention in PyTorch.

    Args:
        query ``[B, Hq, L, E]``, key ``[B, Hkv, S, E]``, value ``[B, Hkv, S, Ev]`` (already
        validated; ``Hq`` a multiple of ``Hkv``); ``score_mod`` or None; ``block_mask`` a
        torch or hf_flexattn BlockMask for ``(L, S)`` (B/H dims 1 or B/Hq); ``scale``
        multiplies ``q @ k^T``; ``kernel_options`` may set ``chunk_columns`` (max gathered
        kv columns per step, default 2048).

    Returns:
        ``out [B, Hq, L, Ev]`` in ``query.dtype`` and ``lse [B, Hq, L]`` (natural log, fp32;
        fp64 for fp64 inputs), ``-inf`` for rows that see nothing. Differentiable w.r.t.
        query, key, value, and floating tensors captured by ``score_mod`` that require grad.
    """
    kernel_options = kernel_options or {}
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    plan = _make_plan(block_mask, L, S, B, Hq, query.device, kernel_options)
    mask_mod = getattr(block_mask, "mask_mod", None)
    needs_grad = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    )
    caps: list[torch.Tensor] = []
    if torch.is_grad_enabled() and score_mod is not None:
        caps = [
            t
            for t in find_captured_tensors(score_mod, score=True, device=query.device)
            if t.requires_grad and t.dtype.is_floating_point
        ]
        needs_grad = needs_grad or bool(caps)
    if not needs_grad:
        with torch.no_grad():
            out, lse, _ = _forward(query, key, value, score_mod, mask_mod, plan, float(scale))
    else:
        out, lse = _FlexAttentionTorch.apply(
            query, key, value, score_mod, mask_mod, plan, float(scale), *caps
        )
    if query.dtype != torch.float64 and lse.dtype != torch.float32:
        lse = lse.float()  # fp32 lse, except fp64 inputs keep fp64 (as torch does)
    return out, lse
