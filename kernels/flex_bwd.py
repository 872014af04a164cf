"""Backward kernels: delta pre-pass, dK/dV per kv tile, dQ per q tile (no atomics for dQ).

* ``delta = rowsum(dO * O) - dLSE`` (fp32 ``[B, Hq, L]``), a plain Triton kernel.
* dK/dV: grid ``(cdiv(S, BLOCK_N), B * Hkv)``. A program owns ``BLOCK_N`` kv rows of one sparse
  kv-block and walks the q-side lists (``q_num_blocks/q_indices``: partial, mask_mod applied;
  ``full_q_*``: full) for every q head of its GQA group, so dK/dV need no atomics.
  Gradients of tensors captured by score_mod are accumulated here (atomic adds inside the
  mod's ``bwd_body``, into fp32 buffers).
* dQ: grid ``(cdiv(L, BLOCK_M), B * Hq)``, walks the kv-side lists like the forward.

Both recompute ``P = exp(score_mod(q.k * scale) - lse)`` per tile; ``dS = P * (dP - delta)``
is passed through the score_mod's backward (``bwd_body``) to get the gradient of the raw
scaled score. Rows that saw nothing (``lse = -inf``) and positions outside ``L``/``S`` or
masked out contribute exactly zero.
"""

from __future__ import annotations

import math
from string import Template
from typing import Any

import torch
import triton
import triton.language as tl

from ._render import interpreter_on, load_rendered
from .flex_fwd import (
    _HEADER,
    LN2,
    LOG2E,
    FwdConfig,
    dot_precision,
    index_args,
    needs_int64,
    next_pow2,
    render_params,
)

__all__ = ["default_bwd_config", "get_kernels", "launch_bwd"]


@triton.jit
def flex_bwd_delta_kernel(
    O,
    DO,
    DLSE,
    DELTA,
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
    EV,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EV_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
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
    base = pid_bh.to(tl.int64) * L
    if HAS_DLSE:
        dlse = tl.load(DLSE + base + offs_m, mask=m_ok, other=0.0)
        delta = delta - dlse
    tl.store(DELTA + base + offs_m, delta, mask=m_ok)


def default_bwd_config(
    capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int
) -> FwdConfig:
    """Backward block sizes (shared by the dK/dV and dQ kernels); None = interpreter."""
    if capability is None:
        return FwdConfig(32, 32, 4, 1)
    d = next_pow2(head_dim)
    if dtype == torch.float32:
        return FwdConfig(32, 32, 4, 1) if d > 64 else FwdConfig(64, 32, 4, 2)
    if d <= 64:
        return FwdConfig(64, 64, 4, 2)
    if d <= 128:
        return FwdConfig(64, 64, 8, 2) if capability[0] >= 9 else FwdConfig(64, 32, 4, 2)
    return FwdConfig(32, 32, 4, 1)


_DKDV = """
@triton.jit
def flex_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    Q_NUM, Q_IDX, s_nb, s_nh, s_nq, s_ib, s_ih, s_iq, s_ik,
    FQ_NUM, FQ_IDX, s_fnb, s_fnh, s_fnq, s_fib, s_fih, s_fiq, s_fik,
    H, HKV, L, S, GROUP, scale,
$params
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_FULL: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    k = tl.load(K + b64 * s_kb + hkv.to(tl.int64) * s_kh + cols[:, None] * s_kn
                + offs_d[None, :] * s_kd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b64 * s_vb + hkv.to(tl.int64) * s_vh + cols[:, None] * s_vn
                + offs_dv[None, :] * s_vd, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, E_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, EV_PAD], dtype=tl.float32)
    kv_idx = offs_n[None, :]
    for g in range(0, GROUP):
        h = hkv * GROUP + g
        q_base = Q + b64 * s_qb + h.to(tl.int64) * s_qh
        do_base = DO + b64 * s_db + h.to(tl.int64) * s_dh
        row_base = (b64 * H + h) * L
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
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    dv_ptrs = (DV + b64 * s_dvb + hkv.to(tl.int64) * s_dvh + cols[:, None] * s_dvn
               + offs_dv[None, :] * s_dvd)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])
"""

_DKDV_LOOP = """
$I        for it in range(0, nb * SUBS):
$I            qblk = tl.load(idx_base + (it // SUBS) * $sik)
$I            start_m = qblk * Q_BLOCK + (it % SUBS) * BLOCK_M
$I            offs_m = start_m + tl.arange(0, BLOCK_M)
$I            m_ok = offs_m < L
$I            if BIG:
$I                rows = offs_m.to(tl.int64)
$I            else:
$I                rows = offs_m
$I            q = tl.load(q_base + rows[:, None] * s_qm + offs_d[None, :] * s_qd,
$I                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
$I            do = tl.load(do_base + rows[:, None] * s_dm + offs_dv[None, :] * s_dd,
$I                         mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
$I            if UPCAST:
$I                q = q.to(tl.float32)
$I                do = do.to(tl.float32)
$I            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
$I            lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
$I            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
$I            q_idx = offs_m[:, None]
$I            qk = tl.dot(q, tl.trans(k)$prec)
$I            s = qk * scale
$score_body$I            valid = m_ok[:, None] & n_ok[None, :]
$mask_part$I            p = tl.exp2(s2 * LOG2E - lse[:, None])
$I            p = tl.where(valid, p, 0.0)
$I            dv += tl.dot(tl.trans(p.to(do.dtype)), do$prec)
$I            dp = tl.dot(do, tl.trans(v)$prec)
$I            ds = p * (dp - delta[:, None])
$grad_body$I            gs = tl.where(valid, gs, 0.0)
$I            dk += tl.dot(tl.trans(gs.to(q.dtype)), q$prec)
"""

_DQ = """
@triton.jit
def flex_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd,
    s_dqb, s_dqh, s_dqm, s_dqd,
    KV_NUM, KV_IDX, s_nb, s_nh, s_nq, s_ib, s_ih, s_iq, s_ik,
    FKV_NUM, FKV_IDX, s_fnb, s_fnh, s_fnq, s_fib, s_fih, s_fiq, s_fik,
    H, L, S, GROUP, scale,
$params
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_FULL: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    q = tl.load(Q + b64 * s_qb + h.to(tl.int64) * s_qh + rows[:, None] * s_qm
                + offs_d[None, :] * s_qd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b64 * s_db + h.to(tl.int64) * s_dh + rows[:, None] * s_dm
                 + offs_dv[None, :] * s_dd, mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * L
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b64 * s_kb + hkv.to(tl.int64) * s_kh
    v_base = V + b64 * s_vb + hkv.to(tl.int64) * s_vh
    dq = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)
    q_idx = offs_m[:, None]
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
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
"""

_DQ_LOOP = """
$I    for it in range(0, nb * SUBS):
$I        kvblk = tl.load(idx_base + (it // SUBS) * $sik)
$I        start_n = kvblk * KV_BLOCK + (it % SUBS) * BLOCK_N
$I        offs_n = start_n + tl.arange(0, BLOCK_N)
$I        n_ok = offs_n < S
$I        if BIG:
$I            cols = offs_n.to(tl.int64)
$I        else:
$I            cols = offs_n
$I        k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :] * s_kd,
$I                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
$I        v = tl.load(v_base + cols[:, None] * s_vn + offs_dv[None, :] * s_vd,
$I                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
$I        if UPCAST:
$I            k = k.to(tl.float32)
$I            v = v.to(tl.float32)
$I        kv_idx = offs_n[None, :]
$I        qk = tl.dot(q, tl.trans(k)$prec)
$I        s = qk * scale
$score_body$I        valid = m_ok[:, None] & n_ok[None, :]
$mask_part$I        p = tl.exp2(s2 * LOG2E - lse[:, None])
$I        p = tl.where(valid, p, 0.0)
$I        dp = tl.dot(do, tl.trans(v)$prec)
$I        ds = p * (dp - delta[:, None])
$I        no_capture_grad = (q_idx < 0) & (kv_idx < 0)
$grad_body$I        gs = tl.where(valid, gs, 0.0)
$I        dq += tl.dot(gs.to(k.dtype), k$prec)
"""


def _loop(
    template: str,
    score_code: Any,
    mask_code: Any,
    partial: bool,
    extra: str,
    body_indent: str,
    prec: str,
    sik: str,
    capture_valid: str,
) -> str:
    ind = body_indent + extra
    score_body = score_code.fwd_body(
        out="s2", score="s", b="b", h="h", q="q_idx", kv="kv_idx", indent=ind
    )
    mask_part = ""
    if partial:
        mask_part = mask_code.fwd_body(
            out="mk", score=None, b="b", h="h", q="q_idx", kv="kv_idx", indent=ind
        )
        mask_part += f"{ind}valid = valid & mk\n"
    grad_body = score_code.bwd_body(
        grad_score="gs",
        grad_out="ds",
        score="s",
        b="b",
        h="h",
        q="q_idx",
        kv="kv_idx",
        valid=capture_valid,
        indent=ind,
    )
    return Template(template).substitute(
        I=extra, prec=prec, score_body=score_body, mask_part=mask_part, grad_body=grad_body, sik=sik
    )


def render_bwd(score_code: Any, mask_code: Any, dtype: torch.dtype) -> str:
    prec = dot_precision(dtype)
    params = render_params(
        list(score_code.params) + list(mask_code.params) + list(score_code.grad_params)
    )
    dkdv = Template(_DKDV).substitute(
        params=params,
        partial_loop=_loop(
            _DKDV_LOOP, score_code, mask_code, True, "", " " * 12, prec, "s_ik", "valid"
        ),
        full_loop=_loop(
            _DKDV_LOOP, score_code, mask_code, False, "    ", " " * 12, prec, "s_fik", "valid"
        ),
    )
    dq = Template(_DQ).substitute(
        params=params,
        partial_loop=_loop(
            _DQ_LOOP, score_code, mask_code, True, "", " " * 8, prec, "s_ik", "no_capture_grad"
        ),
        full_loop=_loop(
            _DQ_LOOP,
            score_code,
            mask_code,
            False,
            "    ",
            " " * 8,
            prec,
            "s_fik",
            "no_capture_grad",
        ),
    )
    header = Template(_HEADER).substitute(family="flex_bwd", log2e=repr(LOG2E), ln2=repr(LN2))
    return header + dkdv + dq


def get_kernels(score_code: Any, mask_code: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    """(dK/dV kernel, dQ kernel) for this pair of mods, rendered once per structure."""
    key = ("flex_bwd", score_code.key, mask_code.key, str(dtype), dot_precision(dtype))
    mod = load_rendered("flex_bwd", key, lambda: render_bwd(score_code, mask_code, dtype))
    return mod.flex_bwd_dkdv_kernel, mod.flex_bwd_dq_kernel


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
    cfg: FwdConfig,
    grad_buffers: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes; captured-tensor gradients are added
    into ``grad_buffers`` (fp32, contiguous, one per ``score_code.grad_params``)."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    e_pad, ev_pad = max(16, next_pow2(E)), max(16, next_pow2(Ev))
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    dlse_c = dlse.float().contiguous() if dlse is not None else lse
    bm_delta = 32
    flex_bwd_delta_kernel[(math.ceil(L / bm_delta), B * H)](
        out,
        dout,
        dlse_c,
        delta,
        *out.stride(),
        *dout.stride(),
        H,
        L,
        Ev,
        HAS_DLSE=dlse is not None,
        BLOCK_M=bm_delta,
        EV_PAD=ev_pad,
    )
    dkdv_kernel, dq_kernel = get_kernels(score_code, mask_code, q.dtype)
    big = needs_int64(
        (L, q.stride(2)),
        (S, k.stride(2)),
        (S, v.stride(2)),
        (L, dout.stride(2)),
        (L, out.stride(2)),
    )
    consts = dict(
        E=E,
        EV=Ev,
        E_PAD=e_pad,
        EV_PAD=ev_pad,
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        Q_BLOCK=q_block,
        KV_BLOCK=kv_block,
        UPCAST=interpreter_on(),
        BIG=big,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    mod_args = [*score_code.runtime_args(), *mask_code.runtime_args(), *grad_buffers]
    has_full_q = full_q_num is not None and full_q_idx is not None
    dkdv_kernel[(math.ceil(S / cfg.BLOCK_N), B * Hkv)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *dk.stride(),
        *dv.stride(),
        *index_args(q_num, q_idx, B, H, (q_num, q_idx)),
        *index_args(full_q_num, full_q_idx, B, H, (q_num, q_idx)),
        H,
        Hkv,
        L,
        S,
        H // Hkv,
        float(scale),
        *mod_args,
        HAS_FULL=has_full_q,
        **consts,
    )
    has_full_kv = full_kv_num is not None and full_kv_idx is not None
    dq_kernel[(math.ceil(L / cfg.BLOCK_M), B * H)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *dq.stride(),
        *index_args(kv_num, kv_idx, B, H, (kv_num, kv_idx)),
        *index_args(full_kv_num, full_kv_idx, B, H, (kv_num, kv_idx)),
        H,
        L,
        S,
        H // Hkv,
        float(scale),
        *mod_args,
        HAS_FULL=has_full_kv,
        **consts,
    )
    return dq, dk, dv
