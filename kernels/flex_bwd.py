"""Backward kernels: delta pre-pass, dK/dV per kv tile (transposed), dQ per q tile.

* Pre-pass: ``delta = rowsum(dO * O) - dLSE`` and ``lse2 = lse * log2(e)`` (0 where
  ``lse = -inf``), both fp32 ``[B, Hq, LP]`` with ``LP = cdiv(L, Q_BLOCK) * Q_BLOCK``; rows
  ``>= L`` hold 0, so the main kernels read them without masks.
* dK/dV: grid ``(cdiv(S, BLOCK_N), Hkv, B)``. A program owns ``BLOCK_N`` kv rows of one sparse
  kv-block and walks the q-side lists (``q_num_blocks/q_indices``: partial, mask_mod applied;
  ``full_q_*``: full) for every q head of its GQA group, so dK/dV need no atomics. It works in
  the TRANSPOSED orientation: ``sT = k @ qT`` is ``[BLOCK_N, BLOCK_M]`` (q loaded as
  ``qT [E_PAD, BLOCK_M]``), ``pT = exp2(sT * log2e - lse2)``, ``dv += pT @ dO``,
  ``dpT = v @ dO^T``, ``dsT = pT * (dpT - delta)``, ``dk += dsT @ q``: no register-held tile
  is ever transposed (on Hopper that costs a shared-memory round trip). The mods' code is
  emitted for that orientation (``transposed=True``: ``q_idx [1, BM]``, ``kv_idx [BN, 1]``).
  Gradients of tensors captured by score_mod are accumulated here (atomic adds inside the
  mod's ``bwd_body``, into fp32 buffers).
* dQ: grid ``(cdiv(L, BLOCK_M), Hq, B)``, walks the kv-side lists like the forward, with
  ``kT``/``vT`` loaded transposed from memory (``s = q @ kT``, ``dp = dO @ vT``,
  ``dq += dS @ kT^T``). Its copy of the mod's backward has the capture atomics stripped.

Both recompute ``P = exp(score_mod(q.k * scale) - lse)`` per tile; ``dS = P * (dP - delta)``
is passed through the score_mod's backward (``bwd_body``) to get the gradient of the raw
scaled score. Rows that saw nothing (``lse = -inf``) and positions outside ``L``/``S`` or
masked out contribute exactly zero.

Constexpr fast paths: ``EVEN_M``/``EVEN_N`` (every row/column a kernel touches lies inside
``L``/``S``) and ``EVEN_D`` (head dims are powers of two >= 16) drop the bounds masks of loads,
stores and of the full tiles' ``where``.

The two kernels have separate block configs (:class:`BwdConfig`): dK/dV wants a small
``BLOCK_M`` and a big ``BLOCK_N``, dQ the opposite. Each is a ``@triton.jit`` tile function
(``_dkdv_tile``, ``_dq_tile``) with a kernel of its own around it; ``flex_bwd_kernel`` runs
both in ONE launch (grid ``(kv tiles + GROUP * q tiles, Hkv, B)``, the dK/dV programs
first), so the dQ programs fill the SMs the dK/dV tail leaves idle. That needs the same
``num_warps``/``num_stages`` for both and is the default when they agree.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from string import Template
from typing import Any

import torch
import triton
import triton.language as tl

from ._launch import check_grid
from ._render import interpreter_on, load_rendered
from .flex_fwd import (
    _HEADER,
    LN2,
    LOG2E,
    FwdConfig,
    _is_identity,
    choose_config,
    dot_precision,
    fp_fusion,
    index_args,
    needs_int64,
    next_pow2,
    render_params,
)

__all__ = ["BwdConfig", "choose_bwd_config", "default_bwd_config", "get_kernels", "launch_bwd"]


@dataclass(frozen=True)
class BwdConfig:
    """Block configs of the two backward kernels (``BLOCK_M``: q rows, ``BLOCK_N``: kv rows)."""

    dkdv: FwdConfig
    dq: FwdConfig
    #: one launch for both (``flex_bwd_kernel``); needs equal ``num_warps`` and ``num_stages``
    fused: bool = False


@triton.jit
def flex_bwd_pre_kernel(
    O,
    DO,
    LSE,
    DLSE,
    DELTA,
    LSE2,
    s_ob,
    s_oh,
    s_om,
    s_od,
    s_db,
    s_dh,
    s_dm,
    s_dd,
    H,
    L,
    LP,
    EV,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EV_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(2) * H + tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, EV_PAD)
    m_ok = offs_m < L
    msk = m_ok[:, None] & (offs_d[None, :] < EV)
    rows = offs_m.to(tl.int64)
    o = tl.load(
        O + b * s_ob + h * s_oh + rows[:, None] * s_om + offs_d[None, :] * s_od, mask=msk, other=0.0
    ).to(tl.float32)
    do = tl.load(
        DO + b * s_db + h * s_dh + rows[:, None] * s_dm + offs_d[None, :] * s_dd,
        mask=msk,
        other=0.0,
    ).to(tl.float32)
    delta = tl.sum(o * do, 1)
    src = pid_bh.to(tl.int64) * L
    if HAS_DLSE:
        dlse = tl.load(DLSE + src + offs_m, mask=m_ok, other=0.0)
        delta = delta - dlse
    lse = tl.load(LSE + src + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    dst = pid_bh.to(tl.int64) * LP
    p_ok = offs_m < LP
    tl.store(DELTA + dst + offs_m, tl.where(m_ok, delta, 0.0), mask=p_ok)
    tl.store(LSE2 + dst + offs_m, tl.where(m_ok, lse2, 0.0), mask=p_ok)


def default_bwd_config(
    capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int
) -> BwdConfig:
    """Backward block configs per (GPU capability, dtype, padded head dim); None = interpreter.

    ``dkdv``: ``BLOCK_M`` = q rows per step, ``BLOCK_N`` = kv rows per program;
    ``dq``: ``BLOCK_M`` = q rows per program, ``BLOCK_N`` = kv rows per step.
    """
    if capability is None:
        return BwdConfig(FwdConfig(32, 32, 4, 1), FwdConfig(32, 32, 4, 1))
    d = next_pow2(head_dim)
    if dtype == torch.float32:
        if d <= 64:
            return BwdConfig(FwdConfig(32, 64, 4, 2), FwdConfig(64, 32, 4, 2))
        return BwdConfig(FwdConfig(32, 32, 4, 1), FwdConfig(32, 32, 4, 1))
    if capability[0] >= 9:
        if d <= 64:
            return BwdConfig(FwdConfig(64, 128, 4, 3), FwdConfig(128, 64, 4, 3))
        if d <= 128:
            return BwdConfig(FwdConfig(64, 128, 8, 3), FwdConfig(128, 64, 8, 3))
        return BwdConfig(FwdConfig(32, 64, 8, 2), FwdConfig(64, 32, 8, 2))
    if capability[0] >= 8:
        if d <= 64:
            return BwdConfig(FwdConfig(64, 64, 4, 2), FwdConfig(64, 64, 4, 2))
        if d <= 128:
            return BwdConfig(FwdConfig(32, 64, 4, 2), FwdConfig(64, 32, 4, 2))
        return BwdConfig(FwdConfig(32, 32, 4, 1), FwdConfig(32, 32, 4, 1))
    return BwdConfig(FwdConfig(32, 32, 4, 1), FwdConfig(32, 32, 4, 1))


def choose_bwd_config(
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    head_dim: int,
    q_len: int,
    q_block: int,
    kv_block: int,
    options: dict[str, Any],
) -> BwdConfig:
    """Default configs, overridden by ``kernel_options``: ``bwd_BLOCK_M``, ``bwd_BLOCK_N``,
    ``bwd_num_warps``, ``bwd_num_stages`` for dK/dV and ``bwd_dq_*`` for dQ; block sizes are
    fitted to the BlockMask's (``BLOCK_M | Q_BLOCK``, ``BLOCK_N | KV_BLOCK``).
    ``bwd_fused``: one launch for both kernels (default: whenever their warps and stages
    agree)."""
    base = default_bwd_config(capability, dtype, head_dim)
    cfgs = []
    for prefix, dflt in (("bwd_", base.dkdv), ("bwd_dq_", base.dq)):
        opts = dict(options)
        for fld in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"):
            opts.setdefault(prefix + fld, getattr(dflt, fld))
        if options.get(prefix + "BLOCK_M") is None and q_len > 0:  # short queries: small tiles
            opts[prefix + "BLOCK_M"] = min(opts[prefix + "BLOCK_M"], max(16, next_pow2(q_len)))
        cfgs.append(
            choose_config(capability, dtype, head_dim, q_len, q_block, kv_block, opts, prefix)
        )
    same = cfgs[0].num_warps == cfgs[1].num_warps and cfgs[0].num_stages == cfgs[1].num_stages
    fused = options.get("bwd_fused")
    if fused is None:
        fused = same
    elif not isinstance(fused, bool):
        raise ValueError(f'kernel_options["bwd_fused"] must be a bool or None, got {fused!r}.')
    elif fused and not same:
        raise ValueError(
            'kernel_options["bwd_fused"]=True needs the same num_warps and num_stages for dK/dV '
            f"and dQ, got {cfgs[0].num_warps}/{cfgs[0].num_stages} and "
            f"{cfgs[1].num_warps}/{cfgs[1].num_stages}; set bwd_dq_num_warps/bwd_dq_num_stages "
            "to match bwd_num_warps/bwd_num_stages, or bwd_fused=False."
        )
    return BwdConfig(*cfgs, fused)


_DKDV = """
@triton.jit
def _dkdv_tile(
    pid_n, pid_bh,
    Q, K, V, DO, LSE2, DELTA, DK, DV,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    Q_NUM, Q_IDX, s_nb, s_nh, s_nq, s_ib, s_ih, s_iq, s_ik,
    FQ_NUM, FQ_IDX, s_fnb, s_fnh, s_fnq, s_fib, s_fih, s_fiq, s_fik,
    H, HKV, L, LP, S, GROUP, scale,
$params
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_FULL: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    kvblk = start_n // KV_BLOCK
    SUBS: tl.constexpr = Q_BLOCK // BLOCK_M
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, E_PAD)
    offs_dv = tl.arange(0, EV_PAD)
    n_ok = offs_n < S
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    if BIG:
        cols = offs_n.to(tl.int64)
    else:
        cols = offs_n
    b64 = b.to(tl.int64)
    k_ptrs = (K + b64 * s_kb + hkv.to(tl.int64) * s_kh + cols[:, None] * s_kn
              + offs_d[None, :] * s_kd)
    v_ptrs = (V + b64 * s_vb + hkv.to(tl.int64) * s_vh + cols[:, None] * s_vn
              + offs_dv[None, :] * s_vd)
    if EVEN_N and EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, E_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, EV_PAD], dtype=tl.float32)
    kv_idx = offs_n[:, None]
    qk_scale = scale * LOG2E  # as the forward computes it
    for g in range(0, GROUP):
        h = hkv * GROUP + g
        q_base = Q + b64 * s_qb + h.to(tl.int64) * s_qh
        do_base = DO + b64 * s_db + h.to(tl.int64) * s_dh
        row_base = (b64 * H + h) * LP
        nb = tl.load(Q_NUM + b * s_nb + h * s_nh + kvblk * s_nq)
        idx_base = Q_IDX + b * s_ib + h * s_ih + kvblk * s_iq
$partial_loop
        if HAS_FULL:
            nb = tl.load(FQ_NUM + b * s_fnb + h * s_fnh + kvblk * s_fnq)
            idx_base = FQ_IDX + b * s_fib + h * s_fih + kvblk * s_fiq
$full_loop
    dk = dk * scale
    dk_ptrs = (DK + b64 * s_dkb + hkv.to(tl.int64) * s_dkh + cols[:, None] * s_dkn
               + offs_d[None, :] * s_dkd)
    dv_ptrs = (DV + b64 * s_dvb + hkv.to(tl.int64) * s_dvh + cols[:, None] * s_dvn
               + offs_dv[None, :] * s_dvd)
    if EVEN_N and EVEN_D:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])
"""

# transposed orientation: tiles are [BLOCK_N, BLOCK_M]
_DKDV_LOOP = """
$I        nxt = tl.load(idx_base, mask=nb > 0, other=0)
$I        for it in range(0, nb * SUBS):
$I            qblk = nxt  # prefetched, as in the forward (flex_fwd._LOOP's note)
$I            nxt = tl.load(idx_base + ((it + 1) // SUBS) * $sik, mask=it + 1 < nb * SUBS,
$I                          other=0)
$I            start_m = qblk * Q_BLOCK + (it % SUBS) * BLOCK_M
$I            offs_m = start_m + tl.arange(0, BLOCK_M)
$I            m_ok = offs_m < L
$I            if BIG:
$I                rows = offs_m.to(tl.int64)
$I            else:
$I                rows = offs_m
$I            qT_ptrs = q_base + rows[None, :] * s_qm + offs_d[:, None] * s_qd
$I            do_ptrs = do_base + rows[:, None] * s_dm + offs_dv[None, :] * s_dd
$I            if EVEN_M and EVEN_D:
$I                qT = tl.load(qT_ptrs)
$I                do = tl.load(do_ptrs)
$I            else:
$I                qT = tl.load(qT_ptrs, mask=m_ok[None, :] & d_ok[:, None], other=0.0)
$I                do = tl.load(do_ptrs, mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
$I            if UPCAST:
$I                qT = qT.to(tl.float32)
$I                do = do.to(tl.float32)
$I            lse2 = tl.load(LSE2 + row_base + offs_m)
$I            delta = tl.load(DELTA + row_base + offs_m)
$I            q_idx = offs_m[None, :]
$I            sT = tl.dot(k, qT$prec)$scaled
$score_body$valid$I            pT = tl.exp2(s2 * $to_log2 - lse2[None, :])
$where_p$I            dv = tl.dot(pT.to(do.dtype), do, dv$prec)
$I            dpT = tl.dot(v, tl.trans(do)$prec)
$I            dsT = pT * (dpT - delta[None, :])
$grad_body$where_gs$I            dk = tl.dot(gs.to(qT.dtype), tl.trans(qT), dk$prec)
"""

_DQ = """
@triton.jit
def _dq_tile(
    pid_m, pid_bh,
    Q, K, V, DO, LSE2, DELTA, DQ,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd,
    s_dqb, s_dqh, s_dqm, s_dqd,
    KV_NUM, KV_IDX, s_nb, s_nh, s_nq, s_ib, s_ih, s_iq, s_ik,
    FKV_NUM, FKV_IDX, s_fnb, s_fnh, s_fnq, s_fib, s_fih, s_fiq, s_fik,
    H, L, LP, S, GROUP, scale,
$params
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_FULL: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    start_m = pid_m * BLOCK_M
    qblk = start_m // Q_BLOCK
    SUBS: tl.constexpr = KV_BLOCK // BLOCK_N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, E_PAD)
    offs_dv = tl.arange(0, EV_PAD)
    m_ok = offs_m < L
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    if BIG:
        rows = offs_m.to(tl.int64)
    else:
        rows = offs_m
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * s_qb + h.to(tl.int64) * s_qh + rows[:, None] * s_qm + offs_d[None, :] * s_qd
    do_ptrs = (DO + b64 * s_db + h.to(tl.int64) * s_dh + rows[:, None] * s_dm
               + offs_dv[None, :] * s_dd)
    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * LP
    lse2 = tl.load(LSE2 + row_base + offs_m)
    delta = tl.load(DELTA + row_base + offs_m)
    k_base = K + b64 * s_kb + hkv.to(tl.int64) * s_kh
    v_base = V + b64 * s_vb + hkv.to(tl.int64) * s_vh
    dq = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)
    q_idx = offs_m[:, None]
    qk_scale = scale * LOG2E  # as the forward computes it
    nb = tl.load(KV_NUM + b * s_nb + h * s_nh + qblk * s_nq)
    idx_base = KV_IDX + b * s_ib + h * s_ih + qblk * s_iq
$partial_loop
    if HAS_FULL:
        nb = tl.load(FKV_NUM + b * s_fnb + h * s_fnh + qblk * s_fnq)
        idx_base = FKV_IDX + b * s_fib + h * s_fih + qblk * s_fiq
$full_loop
    dq = dq * scale
    dq_ptrs = (DQ + b64 * s_dqb + h.to(tl.int64) * s_dqh + rows[:, None] * s_dqm
               + offs_d[None, :] * s_dqd)
    if EVEN_M and EVEN_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
"""

_DQ_LOOP = """
$I    nxt = tl.load(idx_base, mask=nb > 0, other=0)
$I    for it in range(0, nb * SUBS):
$I        kvblk = nxt  # prefetched, as in the forward (flex_fwd._LOOP's note)
$I        nxt = tl.load(idx_base + ((it + 1) // SUBS) * $sik, mask=it + 1 < nb * SUBS, other=0)
$I        start_n = kvblk * KV_BLOCK + (it % SUBS) * BLOCK_N
$I        offs_n = start_n + tl.arange(0, BLOCK_N)
$I        n_ok = offs_n < S
$I        if BIG:
$I            cols = offs_n.to(tl.int64)
$I        else:
$I            cols = offs_n
$I        kT_ptrs = k_base + cols[None, :] * s_kn + offs_d[:, None] * s_kd
$I        vT_ptrs = v_base + cols[None, :] * s_vn + offs_dv[:, None] * s_vd
$I        if EVEN_N and EVEN_D:
$I            kT = tl.load(kT_ptrs)
$I            vT = tl.load(vT_ptrs)
$I        else:
$I            kT = tl.load(kT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
$I            vT = tl.load(vT_ptrs, mask=n_ok[None, :] & dv_ok[:, None], other=0.0)
$I        if UPCAST:
$I            kT = kT.to(tl.float32)
$I            vT = vT.to(tl.float32)
$I        kv_idx = offs_n[None, :]
$I        s = tl.dot(q, kT$prec)$scaled
$score_body$valid$I        p = tl.exp2(s2 * $to_log2 - lse2[:, None])
$where_p$I        dp = tl.dot(do, vT$prec)
$I        ds = p * (dp - delta[:, None])
$grad_body$where_gs$I        dq = tl.dot(gs.to(kT.dtype), tl.trans(kT), dq$prec)
"""


def _strip_atomics(body: str) -> str:
    """Drop the capture-gradient atomics of a ``bwd_body`` (what feeds them is dead code)."""
    return "".join(
        line for line in body.splitlines(True) if not line.lstrip().startswith("tl.atomic_add(")
    )


def _loop(
    template: str,
    score_code: Any,
    mask_code: Any,
    partial: bool,
    extra: str,
    body_indent: str,
    prec: str,
    sik: str,
    transposed: bool,
) -> str:
    """One walk over a block list (partial: mask_mod applied) with the mods' code inlined."""
    ind = body_indent + extra
    orient = {"transposed": transposed}
    s_in = "sT" if transposed else "s"
    gout = "dsT" if transposed else "ds"
    score_body = score_code.fwd_body(
        out="s2", score=s_in, b="b", h="h", q="q_idx", kv="kv_idx", indent=ind, **orient
    )
    bounds = "n_ok[:, None] & m_ok[None, :]" if transposed else "m_ok[:, None] & n_ok[None, :]"
    tile = "[BLOCK_N, BLOCK_M]" if transposed else "[BLOCK_M, BLOCK_N]"
    has_grads = bool(score_code.grad_params)
    even = "EVEN_M and EVEN_N"
    if partial:
        valid = mask_code.fwd_body(
            out="mk", score=None, b="b", h="h", q="q_idx", kv="kv_idx", indent=ind, **orient
        )
        valid += (
            f"{ind}if {even}:\n{ind}    valid = mk\n{ind}else:\n{ind}    valid = mk & ({bounds})\n"
        )
        where_p = f"{ind}pT = tl.where(valid, pT, 0.0)\n"
        where_gs = f"{ind}gs = tl.where(valid, gs, 0.0)\n"
    else:
        valid = f"{ind}if not ({even}):\n{ind}    valid = {bounds}\n"
        if has_grads:
            valid += f"{ind}else:\n{ind}    valid = tl.full({tile}, 1, tl.int1)\n"
        where_p = f"{ind}if not ({even}):\n{ind}    pT = tl.where(valid, pT, 0.0)\n"
        where_gs = f"{ind}if not ({even}):\n{ind}    gs = tl.where(valid, gs, 0.0)\n"
    if not transposed:
        where_p = where_p.replace("pT", "p")
    grad_body = score_code.bwd_body(
        grad_score="gs",
        grad_out=gout,
        score=s_in,
        b="b",
        h="h",
        q="q_idx",
        kv="kv_idx",
        valid="valid",
        indent=ind,
        **orient,
    )
    if not transposed:  # captured-tensor gradients are accumulated by the dK/dV kernel only
        grad_body = _strip_atomics(grad_body)
    # without a score_mod the exponent is the forward's own, q.k * (scale * log2 e) with one
    # rounding: the recomputed P then matches the forward's normaliser to the last bit where
    # the dot products agree, which large scores need (the lse carries an absolute error)
    plain = _is_identity(score_code)
    return Template(template).substitute(
        I=extra,
        prec=prec,
        scaled="" if plain else " * scale",
        to_log2="qk_scale" if plain else "LOG2E",
        score_body=score_body,
        valid=valid,
        where_p=where_p,
        grad_body=grad_body,
        where_gs=where_gs,
        sik=sik,
    )


_INDEX_STRIDES = ("s_nb", "s_nh", "s_nq", "s_ib", "s_ih", "s_iq", "s_ik")
_PER_KERNEL = ("BLOCK_M", "BLOCK_N", "EVEN_M", "EVEN_N")


def _fused_names(part: str) -> dict[str, str]:
    """Parameter renames from a tile function (``"dkdv"``/``"dq"``) into the fused kernel,
    where the two sides' block lists, block sizes and fast-path flags stand side by side."""
    side, num = ("q", "1") if part == "dkdv" else ("kv", "2")
    ren = {n: f"{side}{n}" for n in _INDEX_STRIDES}
    ren.update({n.replace("s_", "s_f", 1): f"{side}{n.replace('s_', 's_f', 1)}"
                for n in _INDEX_STRIDES})
    ren.update({n: n + num for n in _PER_KERNEL})
    ren["HAS_FULL"] = "HAS_FULL_Q" if part == "dkdv" else "HAS_FULL_KV"
    return ren


_FUSED_NAMES = {part: _fused_names(part) for part in ("dkdv", "dq")}


def _signature(src: str, fn: str) -> list[str]:
    """The parameters of ``def fn(...)`` in ``src`` as written (``"E: tl.constexpr"``), minus
    the two program ids."""
    start = src.index(f"def {fn}(") + len(fn) + 5
    params = [p.strip() for p in src[start: src.index("\n):", start)].split(",")]
    return [p for p in params if p and p not in ("pid_n", "pid_bh", "pid_m")]


def _wrappers(src: str) -> str:
    """The kernels around the tile functions: one per side (grid ``(tiles, heads, B)``) and
    the fused one (grid ``(kv tiles + GROUP * q tiles, Hkv, B)``: dK/dV programs first,
    then the dQ programs of each q head of the group)."""
    out = []
    sigs = {}
    for part, fn, kernel, heads in (("dkdv", "_dkdv_tile", "flex_bwd_dkdv_kernel", "HKV"),
                                    ("dq", "_dq_tile", "flex_bwd_dq_kernel", "H")):
        sig = sigs[part] = _signature(src, fn)
        names = ", ".join(p.split(":")[0] for p in sig)
        out.append(
            f"\n@triton.jit\ndef {kernel}(\n    {', '.join(sig)},\n):\n"
            f"    {fn}(tl.program_id(0), tl.program_id(2) * {heads} + tl.program_id(1), {names})\n"
        )
    fused: dict[str, str] = {}
    calls = {}
    for part in ("dkdv", "dq"):
        ren = _FUSED_NAMES[part]
        args = []
        for p in sigs[part]:
            name, _, ann = p.partition(":")
            new = ren.get(name, name)
            fused.setdefault(new, f"{new}:{ann}" if ann else new)
            args.append(new)
        calls[part] = ", ".join(args)
    params = ", ".join(["NKV_TILES", "NQ_TILES", *fused.values()])
    out.append(
        f"\n@triton.jit\ndef flex_bwd_kernel(\n    {params},\n):\n"
        "    pid = tl.program_id(0)\n"
        "    pid_bkv = tl.program_id(2) * HKV + tl.program_id(1)\n"
        "    if pid < NKV_TILES:\n"
        f"        _dkdv_tile(pid, pid_bkv, {calls['dkdv']})\n"
        "    else:\n"
        "        off = pid - NKV_TILES\n"
        "        h = (pid_bkv % HKV) * GROUP + off // NQ_TILES\n"
        f"        _dq_tile(off % NQ_TILES, (pid_bkv // HKV) * H + h, {calls['dq']})\n"
    )
    return "".join(out)


def render_bwd(score_code: Any, mask_code: Any, dtype: torch.dtype) -> str:
    """Source of the backward kernels for this pair of mods: the tile functions
    ``_dkdv_tile``/``_dq_tile``, a kernel for each and the fused ``flex_bwd_kernel``."""
    prec = dot_precision(dtype)
    params = render_params(
        list(score_code.params) + list(mask_code.params) + list(score_code.grad_params)
    )
    loops = {}
    for name, tmpl, body_ind, tr in (
        ("dkdv", _DKDV_LOOP, " " * 12, True),
        ("dq", _DQ_LOOP, " " * 8, False),
    ):
        loops[name] = (
            _loop(tmpl, score_code, mask_code, True, "", body_ind, prec, "s_ik", tr),
            _loop(tmpl, score_code, mask_code, False, "    ", body_ind, prec, "s_fik", tr),
        )
    dkdv = Template(_DKDV).substitute(
        params=params, partial_loop=loops["dkdv"][0], full_loop=loops["dkdv"][1]
    )
    dq = Template(_DQ).substitute(
        params=params, partial_loop=loops["dq"][0], full_loop=loops["dq"][1]
    )
    header = Template(_HEADER).substitute(family="flex_bwd", log2e=repr(LOG2E), ln2=repr(LN2))
    return header + dkdv + dq + _wrappers(dkdv + dq)


def get_kernels(score_code: Any, mask_code: Any, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(dK/dV kernel, dQ kernel, fused kernel) for this pair of mods, rendered once per
    structure."""
    key = ("flex_bwd", 4, score_code.key, mask_code.key, str(dtype), dot_precision(dtype))
    mod = load_rendered("flex_bwd", key, lambda: render_bwd(score_code, mask_code, dtype))
    return mod.flex_bwd_dkdv_kernel, mod.flex_bwd_dq_kernel, mod.flex_bwd_kernel


_POSITIONAL: dict[Any, list[str]] = {}  # kernel -> names of its runtime (non-constexpr) params


def _named(kernel: Any, values: list) -> dict[str, Any]:
    """``values`` (the kernel's runtime arguments, in order) keyed by parameter name."""
    names = _POSITIONAL.get(kernel)
    if names is None:
        params = inspect.signature(kernel.fn).parameters.values()
        names = [p.name for p in params if "constexpr" not in str(p.annotation)]
        _POSITIONAL[kernel] = names
    if len(names) != len(values):  # pragma: no cover - a template/launcher mismatch
        raise RuntimeError(f"{kernel.fn.__name__}: {len(values)} arguments for {len(names)}")
    return dict(zip(names, values))


def launch_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    full_kv_num: torch.Tensor | None,
    full_kv_idx: torch.Tensor | None,
    q_num: torch.Tensor,
    q_idx: torch.Tensor,
    full_q_num: torch.Tensor | None,
    full_q_idx: torch.Tensor | None,
    score_code: Any,
    mask_code: Any,
    scale: float,
    q_block: int,
    kv_block: int,
    cfg: BwdConfig | FwdConfig,
    grad_buffers: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes; captured-tensor gradients are added
    into ``grad_buffers`` (fp32, contiguous, one per ``score_code.grad_params``).

    q ``[B,Hq,L,E]``, k ``[B,Hkv,S,E]``, v/out/dout ``[..,Ev]``, lse ``[B,Hq,L]`` fp32
    contiguous (natural log), dlse ``[B,Hq,L]`` or None. ``cfg``: a :class:`BwdConfig`
    (a single :class:`FwdConfig` is used for both kernels). ``cfg.dkdv.BLOCK_N`` and
    ``cfg.dq.BLOCK_N`` must divide ``kv_block``, the ``BLOCK_M``s must divide ``q_block``."""
    if isinstance(cfg, FwdConfig):
        cfg = BwdConfig(cfg, cfg, True)
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    check_grid(B, H)
    # laid out like their inputs (dense inputs keep their strides), as the fake op says
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if L == 0 or S == 0 or B * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    e_pad, ev_pad = max(16, next_pow2(E)), max(16, next_pow2(Ev))
    lp = math.ceil(L / q_block) * q_block  # rows the q-block lists can reach
    delta = torch.empty((B, H, lp), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((B, H, lp), dtype=torch.float32, device=q.device)
    dlse_c = dlse.float().contiguous() if dlse is not None else lse
    bm_pre = 16 if interpreter_on() else 64
    flex_bwd_pre_kernel[(math.ceil(lp / bm_pre), H, B)](
        out,
        dout,
        lse,
        dlse_c,
        delta,
        lse2,
        *out.stride(),
        *dout.stride(),
        H,
        L,
        lp,
        Ev,
        HAS_DLSE=dlse is not None,
        BLOCK_M=bm_pre,
        EV_PAD=ev_pad,
        **fp_fusion(q.dtype),
    )
    dkdv_kernel, dq_kernel, fused_kernel = get_kernels(score_code, mask_code, q.dtype)
    big = needs_int64(
        (L, q.stride(2)),
        (S, k.stride(2)),
        (S, v.stride(2)),
        (L, dout.stride(2)),
        (L, out.stride(2)),
    )
    common = dict(
        E=E,
        EV=Ev,
        E_PAD=e_pad,
        EV_PAD=ev_pad,
        Q_BLOCK=q_block,
        KV_BLOCK=kv_block,
        UPCAST=interpreter_on(),
        BIG=big,
        EVEN_D=E == e_pad and Ev == ev_pad,
    )
    mod_args = [*score_code.runtime_args(), *mask_code.runtime_args(), *grad_buffers]
    c1, c2 = cfg.dkdv, cfg.dq
    dkdv_pos = [
        q, k, v, dout, lse2, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        *index_args(q_num, q_idx, B, H, (q_num, q_idx)),
        *index_args(full_q_num, full_q_idx, B, H, (q_num, q_idx)),
        H, Hkv, L, lp, S, H // Hkv, float(scale), *mod_args,
    ]
    dkdv_args = _named(dkdv_kernel, dkdv_pos)
    dkdv_args.update(
        HAS_FULL=full_q_num is not None and full_q_idx is not None,
        BLOCK_M=c1.BLOCK_M,
        BLOCK_N=c1.BLOCK_N,
        EVEN_M=L % q_block == 0,  # every q sub-tile of a listed q-block lies inside L
        EVEN_N=S % c1.BLOCK_N == 0,
        **common,
    )
    dq_pos = [
        q, k, v, dout, lse2, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        *index_args(kv_num, kv_idx, B, H, (kv_num, kv_idx)),
        *index_args(full_kv_num, full_kv_idx, B, H, (kv_num, kv_idx)),
        H, L, lp, S, H // Hkv, float(scale), *mod_args,
    ]
    dq_args = _named(dq_kernel, dq_pos)
    dq_args.update(
        HAS_FULL=full_kv_num is not None and full_kv_idx is not None,
        BLOCK_M=c2.BLOCK_M,
        BLOCK_N=c2.BLOCK_N,
        EVEN_M=L % c2.BLOCK_M == 0,
        EVEN_N=S % kv_block == 0,  # every kv sub-tile of a listed kv-block lies inside S
        **common,
    )
    n_kv, n_q = math.ceil(S / c1.BLOCK_N), math.ceil(L / c2.BLOCK_M)
    fusion = fp_fusion(q.dtype)
    if cfg.fused:
        args = {"NKV_TILES": n_kv, "NQ_TILES": n_q}
        for part, vals in (("dkdv", dkdv_args), ("dq", dq_args)):
            ren = _FUSED_NAMES[part]
            args.update((ren.get(n, n), x) for n, x in vals.items())
        fused_kernel[(n_kv + (H // Hkv) * n_q, Hkv, B)](
            **args, num_warps=c1.num_warps, num_stages=c1.num_stages, **fusion
        )
    else:
        dkdv_kernel[(n_kv, Hkv, B)](
            **dkdv_args, num_warps=c1.num_warps, num_stages=c1.num_stages, **fusion
        )
        dq_kernel[(n_q, H, B)](
            **dq_args, num_warps=c2.num_warps, num_stages=c2.num_stages, **fusion
        )
    return dq, dk, dv
