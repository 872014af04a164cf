"""Split-KV (flash-decoding) forward for short queries: ``L * GROUP`` rows against long KV.

Decoding calls attention with ``L`` = 1 (or a few) query rows against ``S`` = thousands of
keys. The regular forward kernel then has only ``B * Hq`` programs, each streaming all of
``S``, and most of each q tile is padding. This kernel instead:

* gives each program ALL ``GROUP = Hq // Hkv`` q heads of one GQA group and all ``L`` rows:
  tile row ``r = g * L + l`` (``g < GROUP``, ``l < L``), padded to ``BLOCK_M`` (a power of
  two >= 16), so K/V of the kv head are read once per group and the dots see a useful M.
  The mods therefore see ``h`` as a ``[BLOCK_M, 1]`` int32 tile (``hkv * GROUP + r // L``)
  and ``q_idx = r % L`` as ``[BLOCK_M, 1]``; ``b`` stays a scalar. Padding rows reuse row 0's
  indices and are never stored.
* splits the q-block's kv work list (partial blocks, then full blocks, each in
  ``KV_BLOCK // BLOCK_N`` sub-tiles) into ``num_splits`` contiguous ranges: grid
  ``(num_splits, Hkv, B)``. Split ``s`` writes its normalised partial output and its
  log2-sum-exp to fp32 workspaces ``[B, Hq, L, num_splits, Ev]`` / ``[B, Hq, L, num_splits]``
  (``-inf`` and 0 for a split that saw nothing).
* the last split of each ``(b, kv head)`` to finish (an arrival counter, atomically
  incremented after a CTA barrier, acq_rel at GPU scope) combines the splits in the same
  launch: ``lse = log(sum_s exp(lse_s))``, ``out = sum_s exp(lse_s - lse) * out_s``; rows
  that see nothing give ``out = 0`` and ``lse = -inf``. One launch instead of two matters
  because decoding is bound by launch overhead. With one split the program writes the
  output directly.

Requirements (checked by :func:`decode_supported`): one q-block row (``L <= Q_BLOCK``), and
the BlockMask's head dim broadcast (``H == 1``) unless ``GROUP == 1`` (with per-head masks the
kv-block lists differ inside a group). Semantics equal the regular forward kernel's: scores
``q.k * scale`` go through score_mod, partial tiles apply mask_mod, positions ``>= S`` never
count; lse is natural log, fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from string import Template
from typing import Any

import torch

from ._launch import _spec, check_grid, launcher_for
from ._layout import empty_like_query, query_order, strides_in_order
from ._render import NoScoreMod, interpreter_on, load_rendered

__all__ = [
    "DecodeConfig",
    "choose_decode_config",
    "decode_supported",
    "get_decode_kernel",
    "launch_decode",
    "MAX_DECODE_ROWS",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_DECODE_ROWS = 64  # L * GROUP rows per program at most
MAX_SPLITS = 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclass(frozen=True)
class DecodeConfig:
    """Block config of the split-KV kernel; ``num_splits`` ranges of the kv work list."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    num_splits: int


def decode_supported(
    L: int, Hq: int, Hkv: int, mask_h: int, q_block: int, max_rows: int = MAX_DECODE_ROWS
) -> bool:
    """True if the split-KV kernel can run this call: ``L * GROUP <= max_rows``, one q-block
    row (``L <= q_block``) and a head-broadcast BlockMask unless ``GROUP == 1``."""
    group = Hq // Hkv
    if L < 1 or L * group > max_rows or L > q_block:
        return False
    return mask_h == 1 or group == 1


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda" or interpreter_on():
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = torch.cuda.get_device_properties(idx).multi_processor_count
        _SM_COUNT[idx] = n
    return n


def _block_n(capability: tuple[int, int] | None, dtype: torch.dtype, d: int) -> tuple[int, ...]:
    """(BLOCK_N, num_warps, num_stages) defaults."""
    if capability is None:
        return 64, 4, 1
    if dtype == torch.float32:
        return (32, 4, 2) if d > 64 else (64, 4, 2)
    if d <= 128:
        return 64, 4, 3
    return 32, 4, 2


def choose_decode_config(
    capability: tuple[int, int] | None,
    device: torch.device,
    dtype: torch.dtype,
    B: int,
    Hq: int,
    Hkv: int,
    L: int,
    S: int,
    head_dim: int,
    kv_block: int,
    num_splits: int | None = None,
) -> DecodeConfig:
    """Pick tiles and the number of splits.

    ``num_splits`` (``kernel_options["split_kv"]``) overrides the choice; by default it aims
    at ``4 * SM count`` programs with each split covering at least ~256 keys.
    """
    rows = L * (Hq // Hkv)
    bm = max(16, _next_pow2(rows))
    bn, warps, stages = _block_n(capability, dtype, _next_pow2(head_dim))
    bn = min(bn, kv_block)
    while kv_block % bn:
        bn //= 2
    if bn < 16:
        raise ValueError(
            "the Triton kernels need the BlockMask's KV block size to be a multiple of 16, "
            f"got {kv_block}; rebuild the mask or use kernel_options={{'backend': 'torch'}}."
        )
    # sub-tiles in the longest list; S enters only through ceil(S / kv_block), which the
    # backend's config cache relies on
    items = math.ceil(S / kv_block) * (kv_block // bn)
    if num_splits is None:
        want = math.ceil(4 * _sm_count(device) / max(1, B * Hkv))
        min_items = max(1, 256 // bn)
        num_splits = max(1, min(want, items // min_items, MAX_SPLITS))
    else:
        num_splits = max(1, min(int(num_splits), items))
    return DecodeConfig(bm, bn, warps, stages, num_splits)


_HEADER = '''"""Generated by hf_flexattn (flex_decode). Do not edit: rendered from a template."""
import triton
import triton.language as tl

LOG2E = tl.constexpr($log2e)
LN2 = tl.constexpr($ln2)
'''

_SPLIT = """
@triton.jit
def flex_decode_split_kernel(
    Q, K, V, OP, LP, O, LSE, CNT,
    s_ob, s_oh, s_om, s_od,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    KV_NUM, KV_IDX, s_nb, s_nh, s_ib, s_ih, s_ik,
    FKV_NUM, FKV_IDX, s_fnb, s_fnh, s_fib, s_fih, s_fik,
    Hq, Hkv, L, S, NS, scale,
$params
    GROUP: tl.constexpr,
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_FULL: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, ONE_SPLIT: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(2)
    hkv = tl.program_id(1)
    pid_bh = b * Hkv + hkv
    h0 = hkv * GROUP
    SUBS: tl.constexpr = KV_BLOCK // BLOCK_N
    r = tl.arange(0, BLOCK_M)
    r_ok = r < GROUP * L
    rc = tl.where(r_ok, r, 0)
    l_row = rc % L
    h = (h0 + rc // L)[:, None]
    q_idx = l_row[:, None]
    offs_d = tl.arange(0, E_PAD)
    offs_dv = tl.arange(0, EV_PAD)
    d_ok = offs_d < E
    dv_ok = offs_dv < EV
    b64 = b.to(tl.int64)
    q_ptrs = (Q + b64 * s_qb + h.to(tl.int64) * s_qh + l_row[:, None].to(tl.int64) * s_qm
              + offs_d[None, :] * s_qd)
    if EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * LOG2E
    k_base = K + b64 * s_kb + hkv.to(tl.int64) * s_kh
    v_base = V + b64 * s_vb + hkv.to(tl.int64) * s_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, EV_PAD], dtype=tl.float32)

    n_part = tl.load(KV_NUM + b * s_nb + h0 * s_nh) * SUBS
    total = n_part
    if HAS_FULL:
        n_full = tl.load(FKV_NUM + b * s_fnb + h0 * s_fnh) * SUBS
        total = n_part + n_full
    per = (total + NS - 1) // NS
    lo = pid_s * per
    hi = tl.minimum(lo + per, total)
    idx_base = KV_IDX + b * s_ib + h0 * s_ih
$partial_loop
    if HAS_FULL:
        idx_base = FKV_IDX + b * s_fib + h0 * s_fih
$full_loop
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    h_row = h0 + rc // L
    row = (b64 * Hq + h_row.to(tl.int64)) * L + l_row.to(tl.int64)  # lse is [B, Hq, L]
    o_ptrs = (O + b64 * s_ob + h_row[:, None].to(tl.int64) * s_oh
              + l_row[:, None].to(tl.int64) * s_om + offs_dv[None, :] * s_od)
    if EVEN_D:
        o_mask = r_ok[:, None]
    else:
        o_mask = r_ok[:, None] & dv_ok[None, :]
    if ONE_SPLIT:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
        tl.store(LSE + row, lse2 * LN2, mask=r_ok)
    else:
        op_ptrs = OP + (row * NS + pid_s)[:, None] * EV + offs_dv[None, :]
        tl.store(op_ptrs, out, mask=o_mask)
        tl.store(LP + row * NS + pid_s, lse2, mask=r_ok)
        # the last split of this (b, kv head) to finish combines all of them: every thread's
        # stores, a CTA barrier, then one acq_rel atomic at GPU scope publish them
        tl.debug_barrier()
        arrived = tl.atomic_add(CNT + pid_bh, 1, sem="acq_rel", scope="gpu")
        if arrived == NS - 1:
            tl.debug_barrier()
            m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
            w_t = tl.zeros([BLOCK_M], dtype=tl.float32)
            o_t = tl.zeros([BLOCK_M, EV_PAD], dtype=tl.float32)
            for sp in range(0, NS):
                # .cg: read through L2, never a stale L1 line of another SM's write
                l_s = tl.load(LP + row * NS + sp, mask=r_ok, other=float("-inf"),
                              cache_modifier=".cg")
                o_s = tl.load(OP + (row * NS + sp)[:, None] * EV + offs_dv[None, :],
                              mask=o_mask, other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_t, l_s)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_t - m_use)
                w_s = tl.exp2(l_s - m_use)
                w_t = w_t * alpha + w_s
                o_t = o_t * alpha[:, None] + o_s * w_s[:, None]
                m_t = m_new
            seen_t = w_t > 0.0
            w_safe = tl.where(seen_t, w_t, 1.0)
            m_fin = tl.where(m_t == float("-inf"), 0.0, m_t)
            tl.store(o_ptrs, (o_t / w_safe[:, None]).to(O.dtype.element_ty), mask=o_mask)
            tl.store(LSE + row, tl.where(seen_t, (m_fin + tl.log2(w_safe)) * LN2,
                                         float("-inf")), mask=r_ok)
            tl.atomic_xchg(CNT + pid_bh, 0)  # ready for the next launch on this stream
"""

_LOOP = """
$I    it0 = $start
$I    it1 = $stop
$I    nxt = tl.load(idx_base + (it0 // SUBS) * $sik, mask=it0 < it1, other=0)
$I    for it in range(it0, it1):
$I        kvblk = nxt  # prefetched, as in the forward (flex_fwd._LOOP's note)
$I        nxt = tl.load(idx_base + ((it + 1) // SUBS) * $sik, mask=it + 1 < it1, other=0)
$I        start_n = kvblk * KV_BLOCK + (it % SUBS) * BLOCK_N
$I        offs_n = start_n + tl.arange(0, BLOCK_N)
$I        n_ok = offs_n < S
$I        if BIG:
$I            cols = offs_n.to(tl.int64)
$I        else:
$I            cols = offs_n
$I        k_ptrs = k_base + cols[:, None] * s_kn + offs_d[None, :] * s_kd
$I        v_ptrs = v_base + cols[:, None] * s_vn + offs_dv[None, :] * s_vd
$I        if EVEN_N and EVEN_D:
$I            k = tl.load(k_ptrs)
$I            v = tl.load(v_ptrs)
$I        else:
$I            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
$I            v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
$I        if UPCAST:
$I            k = k.to(tl.float32)
$I            v = v.to(tl.float32)
$I        qk = tl.dot(q, tl.trans(k)$prec)
$I        kv_idx = offs_n[None, :]
$score_body$mask_part$I        m_new = tl.maximum(m_i, tl.max(s2, 1))
$I        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
$I        alpha = tl.exp2(m_i - m_use)
$I        p = tl.exp2(s2 - m_use[:, None])
$I        l_i = l_i * alpha + tl.sum(p, 1)
$I        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None]$prec)
$I        m_i = m_new
"""


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32 or interpreter_on():
        return ""
    if torch.backends.cuda.matmul.allow_tf32:
        return ', input_precision="tf32"'
    return ', input_precision="ieee"'


def _is_identity(score_code: Any) -> bool:
    return getattr(score_code, "key", None) == NoScoreMod.key


def _loop(score_code: Any, mask_code: Any, partial: bool, prec: str) -> str:
    extra = "" if partial else "    "
    ind = "        " + extra
    if _is_identity(score_code):
        score_body = f"{ind}s2 = qk * qk_scale\n"
        scaled = "s2"
    else:
        score_body = f"{ind}s = qk * scale\n" + score_code.fwd_body(
            out="s2", score="s", b="b", h="h", q="q_idx", kv="kv_idx", indent=ind
        )
        scaled = "s2 * LOG2E"
    if partial:
        mask_part = mask_code.fwd_body(
            out="mk", score=None, b="b", h="h", q="q_idx", kv="kv_idx", indent=ind
        )
        mask_part += (
            f"{ind}if EVEN_N:\n{ind}    keep = mk\n{ind}else:\n{ind}    keep = mk & n_ok[None, :]\n"
            f'{ind}s2 = tl.where(keep, {scaled}, float("-inf"))\n'
        )
        start, stop, sik = "lo", "tl.minimum(hi, n_part)", "s_ik"
    else:
        mask_part = f"{ind}if EVEN_N:\n{ind}    s2 = {scaled}\n{ind}else:\n"
        mask_part += f'{ind}    s2 = tl.where(n_ok[None, :], {scaled}, float("-inf"))\n'
        start, stop, sik = "tl.maximum(lo, n_part) - n_part", "hi - n_part", "s_fik"
    return Template(_LOOP).substitute(
        I=extra,
        prec=prec,
        score_body=score_body,
        mask_part=mask_part,
        start=start,
        stop=stop,
        sik=sik,
    )


def render_decode(score_code: Any, mask_code: Any, dtype: torch.dtype) -> str:
    """Source of the split-KV kernel for this pair of mods."""
    prec = _dot_precision(dtype)
    names = list(score_code.params) + list(mask_code.params)
    return Template(_HEADER).substitute(log2e=repr(LOG2E), ln2=repr(LN2)) + Template(
        _SPLIT
    ).substitute(
        params="".join(f"    {n},\n" for n in names),
        partial_loop=_loop(score_code, mask_code, True, prec),
        full_loop=_loop(score_code, mask_code, False, prec),
    )


def get_decode_kernel(score_code: Any, mask_code: Any, dtype: torch.dtype) -> Any:
    """The split-KV kernel, rendered once per (mods' structure, dtype)."""
    key = ("flex_decode", 2, score_code.key, mask_code.key, str(dtype), _dot_precision(dtype))
    mod = load_rendered("flex_decode", key, lambda: render_decode(score_code, mask_code, dtype))
    return mod.flex_decode_split_kernel


# ------------------------------------------------------------------------------ workspace
_WORKSPACE: dict[tuple, tuple[torch.Tensor, ...]] = {}
_MAX_WORKSPACES = 16


def _new_workspace(device, B, Hq, Hkv, L, ns, Ev) -> tuple[torch.Tensor, ...]:
    return (
        torch.empty((B, Hq, L, ns, Ev), dtype=torch.float32, device=device),
        torch.empty((B, Hq, L, ns), dtype=torch.float32, device=device),
        torch.zeros((B * Hkv,), dtype=torch.int32, device=device),
        torch.empty((B, Hq, L), dtype=torch.float32, device=device),
    )


def _workspace(
    device: torch.device, B: int, Hq: int, Hkv: int, L: int, ns: int, Ev: int
) -> tuple[torch.Tensor, ...]:
    """fp32 partial out ``[B, Hq, L, ns, Ev]`` and lse ``[B, Hq, L, ns]``, the int32
    arrival counters ``[B * Hkv]`` (zero between launches: the last split resets its
    counter) and a scratch lse ``[B, Hq, L]`` for callers that do not want it; reused per
    shape and CUDA stream (launches on one stream never overlap); fresh while a CUDA graph
    is being captured."""
    stream = None
    if device.type == "cuda":
        if torch._C._cuda_isCurrentStreamCapturing():
            return _new_workspace(device, B, Hq, Hkv, L, ns, Ev)
        stream = torch._C._cuda_getCurrentRawStream(device.index)
    key = (device, stream, B, Hq, Hkv, L, ns, Ev)
    ws = _WORKSPACE.get(key)
    if ws is None:
        if len(_WORKSPACE) >= _MAX_WORKSPACES:
            _WORKSPACE.pop(next(iter(_WORKSPACE)))
        ws = _new_workspace(device, B, Hq, Hkv, L, ns, Ev)
        _WORKSPACE[key] = ws
    return ws


def _index_args(num: torch.Tensor, idx: torch.Tensor, B: int, H: int) -> list:
    """Pointers and (b, h, k) strides of a q-block-0 index pair; broadcast dims stride 0
    (what ``expand(B, H, ...)`` would give, without making the views)."""
    ns, isd = num.stride(), idx.stride()
    nsh, ish = num.shape, idx.shape
    return [
        num,
        idx,
        0 if nsh[0] == 1 else ns[0],
        0 if nsh[1] == 1 else ns[1],
        0 if ish[0] == 1 else isd[0],
        0 if ish[1] == 1 else isd[1],
        isd[3],
    ]


class DecodePlan:
    """A decode launch with everything but q, k, v fixed (built by :func:`plan_decode`).

    ``plan(q, k, v) -> (out, lse)`` for tensors with the shapes and strides the plan was
    built from; only their pointers are inspected (the kernel is specialised on alignment),
    so a call costs the output allocations and one launch."""

    def __init__(self, split: Any, out_shape: tuple, dtype: torch.dtype,
                 device: torch.device, ws: tuple, out_strides: tuple) -> None:
        self.split = split
        # out's strides (q's memory order): what the launch was bound with
        self.out_shape, self.lse_shape = out_shape, out_shape[:3]
        self.out_strides = out_strides
        # out as Transformers wants it, [B, L, Hq, Ev] contiguous, where that is the memory
        # the launch writes (q from a [B, L, Hq, E] projection, or L == 1): run(blhd=True)
        # then allocates it directly instead of transposing
        B, H, L, Ev = out_shape
        blhd = (L * H * Ev, Ev, H * Ev, 1)  # its strides, seen as [B, Hq, L, Ev]
        same = all(n == 1 or a == b for n, a, b in zip(out_shape, out_strides, blhd))
        self.blhd_shape = (B, L, H, Ev) if same else None
        self.dtype, self.device, self.ws = dtype, device, ws
        self.cuda = device.type == "cuda"
        self._stream: int | None = None  # the stream of the last call, and its workspace
        self._ws: tuple | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 need_lse: bool = True, blhd: bool = False) -> tuple:
        return self.run(q, k, v, need_lse, blhd=blhd)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            need_lse: bool = True, fresh: bool = False, blhd: bool = False) -> tuple:
        """``(out [B, Hq, L, Ev], lse [B, Hq, L])``; ``plan(q, k, v)`` calls this. Without
        ``need_lse`` the lse is ``None`` (written to a scratch buffer). ``fresh``: new
        workspace buffers instead of the cached ones (calls from compiled graphs, whose
        allocations may come from a CUDA-graph pool that must not be cached). ``blhd``: out
        as ``[B, L, Hq, Ev]`` instead (contiguous where the plan's layout allows)."""
        nat = self.blhd_shape if blhd else None
        if nat is not None:  # the same memory as the launch's [B, Hq, L, Ev] strides
            out = torch.empty(nat, dtype=self.dtype, device=self.device)
        else:
            out = torch.empty_strided(
                self.out_shape, self.out_strides, dtype=self.dtype, device=self.device
            )
        if fresh:
            op, lp, cnt, scratch = _new_workspace(self.device, *self.ws)
        elif self.cuda and not torch._C._cuda_isCurrentStreamCapturing():
            # the same stream as the last call: its workspace (one stream's launches never
            # overlap, whichever cached workspace they use)
            stream = torch._C._cuda_getCurrentRawStream(self.device.index)
            if stream != self._stream:
                self._ws = _workspace(self.device, *self.ws)
                self._stream = stream
            op, lp, cnt, scratch = self._ws
        else:
            op, lp, cnt, scratch = _workspace(self.device, *self.ws)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device) if (
            need_lse
        ) else scratch
        self.split(q, k, v, op, lp, out, lse, cnt)
        if blhd and nat is None:
            out = out.transpose(1, 2)
        return out, (lse if need_lse else None)


class DecodeTemplate:
    """The part of a decode launch that stays the same from one decoding step to the next:
    the query's shape and layout, head counts and dims, the score_mod's arguments, scale,
    kv block size and the launch constants that follow from them (with their launch
    specialisation, computed once). :meth:`plan` adds one step's keys, BlockMask tensors,
    mask_mod captures and config. ``q`` only provides its shape and strides."""

    def __init__(self, q: torch.Tensor, Hkv: int, Ev: int, score_code: Any, scale: float,
                 kv_block: int, has_full: bool, kernel: Any) -> None:
        B, Hq, L, E = q.shape
        check_grid(B, Hkv)
        self.B, self.Hq, self.L, self.Hkv, self.Ev = B, Hq, L, Hkv, Ev
        self.kv_block, self.has_full = kv_block, has_full
        self.dtype, self.device = q.dtype, q.device
        e_pad, ev_pad = max(16, _next_pow2(E)), max(16, _next_pow2(Ev))
        self.out_strides = strides_in_order((B, Hq, L, Ev), query_order(q))  # q's order
        self.launcher = launcher_for(kernel)
        # kernel arguments in signature order, in runs that do (dyn) or do not change per step
        self.out_q = (*self.out_strides, *q.stride())
        self.heads = (Hq, Hkv, L)
        self.scale_score = (float(scale), *score_code.runtime_args())
        self.specs = [_spec(self.out_q), _spec(self.heads), _spec(self.scale_score)]
        self.constexprs = dict(
            GROUP=Hq // Hkv, E=E, EV=Ev, E_PAD=e_pad, EV_PAD=ev_pad, BLOCK_M=0, BLOCK_N=0,
            KV_BLOCK=kv_block, HAS_FULL=has_full, UPCAST=interpreter_on(), BIG=False,
            EVEN_N=False, EVEN_D=E == e_pad and Ev == ev_pad, ONE_SPLIT=False, num_warps=0,
            num_stages=0, enable_fp_fusion=True,  # Triton's default before 3.10, kept
        )
        # (step argument spec, config, BIG, EVEN_N) -> (constexprs, tail spec, shared entry)
        self.steps: dict[tuple, tuple] = {}
        self._idx: tuple | None = None  # the last step's index tensors and their part
        # (index part, config, {(own spec, BIG, EVEN_N): steps entry}) of the last raw steps
        self._fast: tuple | None = None

    def _index_part(self, kv_num: torch.Tensor, kv_idx: torch.Tensor,
                    full_num: torch.Tensor | None, full_idx: torch.Tensor | None,
                    reuse: bool) -> tuple:
        """``(args, spec, direct args)`` of the BlockMask's index pairs (see
        :func:`_index_args`; ``direct``: the tensors as pointers, None unless ``reuse``).
        ``reuse``: the tensors are the library's own and never swapped, so launches may take
        their pointers and the last step's part is kept while a step brings the same four
        tensors (a decoding step's views are cached)."""
        c = self._idx
        if (reuse and c is not None and c[0] is kv_num and c[1] is kv_idx
                and c[2] is full_num and c[3] is full_idx):
            return c[4]
        B, Hq = self.B, self.Hq
        kvi = _index_args(kv_num, kv_idx, B, Hq)
        fkvi = _index_args(full_num, full_idx, B, Hq) if self.has_full else kvi
        args = (*kvi, *fkvi)
        direct = None
        if reuse:  # (_index_args: the two tensors come first)
            direct = (kvi[0].data_ptr(), kvi[1].data_ptr(), *kvi[2:],
                      fkvi[0].data_ptr(), fkvi[1].data_ptr(), *fkvi[2:])
        part = (args, _spec(args), direct)
        self._idx = (kv_num, kv_idx, full_num, full_idx, part) if reuse else None
        return part

    def plan(self, k: torch.Tensor, v: torch.Tensor, kv_num: torch.Tensor,
             kv_idx: torch.Tensor, full_num: torch.Tensor | None, full_idx: torch.Tensor | None,
             mask_code: Any, cfg: DecodeConfig, kv_strides: tuple | None = None,
             raw: bool = False, mask_args: tuple[tuple, tuple] | None = None) -> DecodePlan:
        """The :class:`DecodePlan` for one step (k ``[B, Hkv, S, E]``, v ``[B, Hkv, S, Ev]``
        with this template's batch, heads and dims; BlockMask tensors of its batch/head
        broadcast and block size; ``mask_code`` bound to this step's captures;
        ``kv_strides``: ``(k.stride(), v.stride())`` if the caller has read them; ``raw``:
        the BlockMask and mask-capture tensors are the library's own, never swapped, so
        launches may pass their pointers as ints (see ``_launch.Bound``); ``mask_args``:
        ``(mask_code.runtime_args(), mask_code.runtime_args(pointers=True))`` if the caller
        has them (then ``mask_code`` is not read))."""
        S, ns = k.shape[2], cfg.num_splits
        ks, vs = (k.stride(), v.stride()) if kv_strides is None else kv_strides
        idx_part = self._index_part(kv_num, kv_idx, full_num, full_idx, raw)
        idx_args, idx_spec, idx_direct = idx_part
        if mask_args is None:
            margs = tuple(mask_code.runtime_args())
            mdirect = tuple(mask_code.runtime_args(pointers=True)) if raw else None
        else:
            margs, mdirect = mask_args
        # the step's own values in one pass: k and v strides, S and ns, the mask's arguments
        own = _spec((*ks, *vs, S, ns, *margs))
        big = S * max(abs(ks[2]), abs(vs[2])) >= 2**31 - 1
        even = S % self.kv_block == 0
        # consecutive steps mostly bring the same index part and config (the same objects):
        # their entries are then found by the step's own spec alone
        fast = fkey = None
        if raw and own is not None:
            fast = self._fast
            if fast is None or fast[0] is not idx_part or fast[1] is not cfg:
                fast = self._fast = (idx_part, cfg, {})
            fkey = (own, big, even)
            hit = fast[2].get(fkey)
            if hit is not None:
                return self._clone(hit, ks, vs, S, ns, idx_args, idx_direct, margs, mdirect)
        dspec = kv_spec = sn_spec = m_spec = None
        if own is not None and idx_spec is not None:
            n = len(ks) + len(vs)
            kv_spec, sn_spec, m_spec = own[:n], own[n : n + 2], own[n + 2 :]
            dspec = kv_spec + idx_spec + sn_spec + m_spec
        # one entry per specialisation of the step's arguments and launch constants:
        # consecutive steps share it (and with it the compiled kernel their launches find)
        ckey = (dspec, cfg, big, even)
        hit = None if dspec is None else self.steps.get(ckey)
        if hit is None:
            cx = dict(self.constexprs)
            cx.update(
                BLOCK_M=cfg.BLOCK_M,
                BLOCK_N=cfg.BLOCK_N,
                BIG=big,
                EVEN_N=ckey[3],
                ONE_SPLIT=ns == 1,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
            spec = None
            if dspec is not None and None not in self.specs:
                spec = (self.specs[0] + kv_spec + idx_spec + self.specs[1] + sn_spec
                        + self.specs[2] + m_spec)
            hit = [cx, spec, self.launcher.shared_entry(cx), None]
            if dspec is not None:
                if len(self.steps) >= 64:
                    self.steps.clear()
                self.steps[ckey] = hit
        cx, spec, shared, _ = hit
        tail, direct = self._tails(ks, vs, S, ns, idx_args, idx_direct, margs, mdirect)
        # only q, k and v may be misaligned views: the workspace and outputs are fresh
        # allocations (see DecodePlan.run)
        bound = self.launcher.bind((ns, self.Hkv, self.B), tail, cx, tail_spec=spec,
                                   shared=shared, checked=3, direct_tail=direct)
        plan = DecodePlan(
            bound, (self.B, self.Hq, self.L, self.Ev), self.dtype, self.device,
            (self.B, self.Hq, self.Hkv, self.L, ns, self.Ev), self.out_strides,
        )
        if fast is not None and dspec is not None:
            hit[3] = plan  # the prototype later steps of this entry are cloned from
            if len(fast[2]) >= 16:
                fast[2].clear()
            fast[2][fkey] = hit
        return plan

    def _tails(self, ks: tuple, vs: tuple, S: int, ns: int, idx_args: tuple,
               idx_direct: tuple | None, margs: tuple, mdirect: tuple | None) -> tuple:
        """``(tail, direct tail)`` of a step's launch (the arguments after q, k, v and the
        buffers, in signature order); the direct tail passes the step's own tensors as
        pointers (the score_mod's captures stay tensors), None unless both pointer forms
        are given (raw plans)."""
        lead, mid = (*self.out_q, *ks, *vs), (*self.heads, S, ns, *self.scale_score)
        tail = (*lead, *idx_args, *mid, *margs)
        if idx_direct is None or mdirect is None:
            return tail, None
        return tail, (*lead, *idx_direct, *mid, *mdirect)

    def _clone(self, hit: list, ks: tuple, vs: tuple, S: int, ns: int, idx_args: tuple,
               idx_direct: tuple, margs: tuple, mdirect: tuple) -> DecodePlan:
        """A plan like ``hit``'s prototype (the same launch entry, constants, grid and output
        layout) with this step's launch arguments: the prototype's Bound and DecodePlan
        copied and their per-step fields replaced, which is cheaper than building both."""
        proto = hit[3]
        bound = object.__new__(type(proto.split))
        vars(bound).update(vars(proto.split))
        bound.tail, bound.direct_tail = self._tails(ks, vs, S, ns, idx_args, idx_direct, margs,
                                                    mdirect)
        plan = object.__new__(DecodePlan)
        vars(plan).update(vars(proto))
        plan.split = bound
        return plan


def plan_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    full_num: torch.Tensor | None,
    full_idx: torch.Tensor | None,
    score_code: Any,
    mask_code: Any,
    scale: float,
    kv_block: int,
    cfg: DecodeConfig,
    kernel: Any = None,
    template_out: list | None = None,
) -> DecodePlan:
    """The :class:`DecodePlan` of :func:`launch_decode` for these arguments (``B * Hq * L``
    must be positive); ``template_out`` (a list) also receives its :class:`DecodeTemplate`."""
    split = kernel or get_decode_kernel(score_code, mask_code, q.dtype)
    has_full = full_num is not None and full_idx is not None
    t = DecodeTemplate(q, k.shape[1], v.shape[3], score_code, scale, kv_block, has_full, split)
    if template_out is not None:
        template_out.append(t)
    return t.plan(k, v, kv_num, kv_idx, full_num, full_idx, mask_code, cfg)


def launch_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    full_num: torch.Tensor | None,
    full_idx: torch.Tensor | None,
    score_code: Any,
    mask_code: Any,
    scale: float,
    kv_block: int,
    cfg: DecodeConfig,
    kernel: Any = None,
    plan: DecodePlan | None = None,
    fresh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the split-KV forward (``kernel``: from :func:`get_decode_kernel`, if the caller
    keeps it; ``plan``: the :func:`plan_decode` of these same arguments, if already made;
    ``fresh``: see :meth:`DecodePlan.run`).
    q ``[B,Hq,L,E]``, k ``[B,Hkv,S,E]``, v ``[B,Hkv,S,Ev]``
    (last dims contiguous recommended), BlockMask index tensors ``[Bm, Hm, nQ(, k)]`` whose
    q-block 0 covers all ``L`` rows. Returns out ``[B,Hq,L,Ev]`` (q's dtype, stored in q's
    memory order) and lse
    ``[B,Hq,L]`` fp32 natural log (``-inf`` where a row sees nothing)."""
    B, Hq, L, _ = q.shape
    if L == 0 or B * Hq == 0:
        out = empty_like_query(q, v.shape[3])
        return out, torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if plan is None:
        plan = plan_decode(
            q, k, v, kv_num, kv_idx, full_num, full_idx, score_code, mask_code, scale, kv_block,
            cfg, kernel,
        )
    return plan.run(q, k, v, fresh=fresh)
