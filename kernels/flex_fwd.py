"""Forward kernel: block-sparse attention with inlined score_mod / mask_mod.

Grid ``(cdiv(L, BLOCK_M), Hq, B)``: heads and batch on the grid's y and z axes, each at most
65535 (``_launch.check_grid`` refuses more before a launch). Each program owns ``BLOCK_M``
query rows inside one sparse q-block (``BLOCK_M`` divides ``Q_BLOCK``) and walks, from the
BlockMask, first the PARTIAL kv blocks (mask_mod applied) and then the FULL kv blocks
(mask_mod skipped), each in ``KV_BLOCK // BLOCK_N`` sub-tiles. Scores are ``q.k * scale``
(what score_mod sees), then multiplied by ``log2(e)`` for an ``exp2`` online softmax with
fp32 accumulators. Rows that see
nothing give ``out = 0`` and ``lse = -inf``; ``lse`` is natural log, fp32, ``[B, Hq, L]``
contiguous. GQA: q head ``h`` reads kv head ``h // GROUP``. Positions ``q >= L`` or
``kv >= S`` never count. Head dims are padded to powers of two with masked loads.
Constexpr fast paths: ``EVEN_M`` (``L % BLOCK_M == 0``), ``EVEN_N`` (``S % KV_BLOCK == 0``) and
``EVEN_D`` (head dims are powers of two >= 16) drop the bounds masks; without a score_mod the
``scale * log2(e)`` factor is applied in one multiply.

The kernel source is rendered per (score key, mask key, dtype, head dims, block config) by
:func:`get_kernel` and launched by :func:`launch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from string import Template
from typing import Any

import torch

from ._launch import check_grid, descriptor_type, launcher_for
from ._layout import empty_like_query
from ._render import interpreter_on, load_rendered

__all__ = ["FwdConfig", "choose_config", "get_kernel", "launch", "next_pow2"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclass(frozen=True)
class FwdConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    tma: bool = False  # forward only: K/V through tensor descriptors where they qualify


def _largest_pow2_divisor_le(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def fit_block(name: str, want: int, sparse_block: int, which: str) -> int:
    """Largest power of two <= ``want`` dividing ``sparse_block``; at least 16 (tl.dot)."""
    blk = _largest_pow2_divisor_le(sparse_block, max(16, want))
    if blk < 16:
        raise ValueError(
            f"the Triton kernels need the BlockMask's {which} block size to be a multiple of "
            f"16, got {sparse_block} (for {name}); rebuild the mask with BLOCK_SIZE a multiple "
            "of 16 or use kernel_options={'backend': 'torch'}."
        )
    return blk


def default_fwd_config(
    capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int
) -> FwdConfig:
    """Forward block sizes per (GPU capability, dtype, padded head dim); None = interpreter."""
    if capability is None:  # interpreter: big tiles mean fewer Python-level steps
        return FwdConfig(64, 64, 4, 1)
    d = next_pow2(head_dim)
    if dtype == torch.float32:
        if d <= 64:
            return FwdConfig(64, 64, 4, 2)
        if d <= 128:
            return FwdConfig(64, 32, 4, 2)
        return FwdConfig(32, 32, 4, 1)
    if capability[0] >= 9:
        if d <= 64:
            return FwdConfig(128, 64, 4, 3)
        if d <= 128:
            # measured on H100, S=8192, 32 heads, bf16 (scratch sweep 2026-11-25): 128/128/8/2
            # beats 128/64/4/3 by 10-40% (full 452 vs 355, documents 194 vs 115 TFLOPs); on
            # the H200 (config_sweep.py, 2026-12-01/02) three stages are as fast or faster on
            # every shape measured: causal 8k 1.28 vs 1.32 ms, documents 8k 1.16 vs 1.17,
            # the training row 0.620 vs 0.622, the 8 x 2,048 prompt 0.373 vs 0.402. With the
            # tile index prefetched and K/V through tensor descriptors (the Hopper default,
            # below; 2026-12-03) it stays the best of config_sweep.py's: the training row
            # 0.548 ms, documents 8k at 64 heads 1.014 (64/64/4/3: 0.707 and 1.388 with
            # descriptors, 0.561 and 1.114 without)
            return FwdConfig(128, 128, 8, 3)
        return FwdConfig(64, 32, 4, 2)
    if capability[0] >= 8:
        if d <= 64:
            return FwdConfig(128, 64, 4, 3)
        if d <= 128:
            return FwdConfig(128, 32, 4, 3)
        return FwdConfig(64, 32, 4, 2)
    if d <= 128:
        return FwdConfig(64, 32, 4, 2)
    return FwdConfig(32, 32, 4, 1)


def choose_config(
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    head_dim: int,
    q_len: int,
    q_block: int,
    kv_block: int,
    options: dict[str, Any],
    prefix: str = "",
) -> FwdConfig:
    """Default config from the table, overridden by ``options[prefix + "BLOCK_M"]`` etc.,
    then fitted to the BlockMask's block sizes (BLOCK_M | Q_BLOCK, BLOCK_N | KV_BLOCK)."""
    base = default_fwd_config(capability, dtype, head_dim)
    vals = {}
    for field in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"):
        v = options.get(prefix + field)
        if v is None:
            v = getattr(base, field)
        elif isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(
                f'kernel_options["{prefix}{field}"] must be a positive int, got {v!r}.'
            )
        vals[field] = v
    for field in ("BLOCK_M", "BLOCK_N"):
        v = vals[field]
        if options.get(prefix + field) is not None and (v < 16 or v & (v - 1)):
            raise ValueError(
                f'kernel_options["{prefix}{field}"] must be a power of two >= 16, got {v}.'
            )
    bm = vals["BLOCK_M"]
    if options.get(prefix + "BLOCK_M") is None and q_len > 0:  # short queries: small tiles
        bm = min(bm, max(16, next_pow2(q_len)))
    bm = fit_block(prefix + "BLOCK_M", bm, q_block, "Q")
    bn = fit_block(prefix + "BLOCK_N", vals["BLOCK_N"], kv_block, "KV")
    tma = False
    if not prefix:
        tma = options.get("tma")
        if tma is not None and not isinstance(tma, bool):
            raise ValueError(f'kernel_options["tma"] must be a bool or None, got {tma!r}.')
        if tma is None:  # on for 16-bit inputs on Hopper: at 128 x 128 tiles, 8-10 % off
            # the forward on an H200 (training row 0.598 -> 0.548 ms, documents 8k at 64
            # heads 1.119 -> 1.014, the 8 x 2,048 prompt 0.376 -> 0.342; head dim 64,
            # 128 x 64 tiles: 0.400 -> 0.389)
            tma = capability is not None and capability[0] == 9 and dtype in (
                torch.float16, torch.bfloat16)
    return FwdConfig(bm, bn, vals["num_warps"], vals["num_stages"], tma)


_HEADER = '''"""Generated by hf_flexattn ($family). Do not edit: re-rendered from the template."""
import triton
import triton.language as tl

LOG2E = tl.constexpr($log2e)
LN2 = tl.constexpr($ln2)
'''

_FWD = """
@triton.jit
def flex_fwd_kernel(
    Q, K, V, O, LSE, K_DESC, V_DESC,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    KV_NUM, KV_IDX, s_nb, s_nh, s_nq, s_ib, s_ih, s_iq, s_ik,
    FKV_NUM, FKV_IDX, s_fnb, s_fnh, s_fnq, s_fib, s_fih, s_fiq, s_fik,
    H, L, S, GROUP, scale,
$params
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_FULL: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    POS_SCALE: tl.constexpr, TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(2)
    h = tl.program_id(1)
    pid_bh = b * H + h
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
    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * LOG2E
    k_base = K + b64 * s_kb + hkv.to(tl.int64) * s_kh
    v_base = V + b64 * s_vb + hkv.to(tl.int64) * s_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, EV_PAD], dtype=tl.float32)
    q_idx = offs_m[:, None]

    nb = tl.load(KV_NUM + b * s_nb + h * s_nh + qblk * s_nq)
    idx_base = KV_IDX + b * s_ib + h * s_ih + qblk * s_iq
$partial_loop
    if HAS_FULL:
        nb = tl.load(FKV_NUM + b * s_fnb + h * s_fnh + qblk * s_fnq)
        idx_base = FKV_IDX + b * s_fib + h * s_fih + qblk * s_fiq
$full_loop
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    o_ptrs = O + b64 * s_ob + h.to(tl.int64) * s_oh + rows[:, None] * s_om + offs_dv[None, :] * s_od
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    if EVEN_M:
        tl.store(LSE + pid_bh.to(tl.int64) * L + offs_m, lse)
    else:
        tl.store(LSE + pid_bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)
"""

# The tile index for the next step is loaded one step ahead, into registers. Loaded in the
# step that uses it, Triton's pipeliner (3.6 and 3.9, sm_90) turns the load into an async
# copy committed after the K/V copies, and the loop's wait then drains every copy in flight
# (``async_wait {num = 0}``), so K/V loads no longer overlap the math. On an H200 that cost
# the prompt's forward 2-9 % (``fwd_loop_variants.py --bisect``: "inloop" against the kernel
# as rendered, BENCHMARKS.md session 10); the backward's loops load theirs the same way.
_LOOP = """
$I    nxt = tl.load(idx_base, mask=nb > 0, other=0)
$I    for it in range(0, nb * SUBS):
$I        kvblk = nxt  # prefetched: see the note above _LOOP
$I        nxt = tl.load(idx_base + ((it + 1) // SUBS) * $sik, mask=it + 1 < nb * SUBS, other=0)
$I        start_n = kvblk * KV_BLOCK + (it % SUBS) * BLOCK_N
$I        offs_n = start_n + tl.arange(0, BLOCK_N)
$I        n_ok = offs_n < S
$I        if BIG:
$I            cols = offs_n.to(tl.int64)
$I        else:
$I            cols = offs_n
$I        if TMA:  # [1, 1, BLOCK_N, E_PAD] boxes; rows past S and dims past E read as 0
$I            k = K_DESC.load([b, hkv, start_n, 0]).reshape(BLOCK_N, E_PAD)
$I            v = V_DESC.load([b, hkv, start_n, 0]).reshape(BLOCK_N, EV_PAD)
$I        else:
$I            k_ptrs = k_base + cols[:, None] * s_kn + offs_d[None, :] * s_kd
$I            v_ptrs = v_base + cols[:, None] * s_vn + offs_dv[None, :] * s_vd
$I            if EVEN_N and EVEN_D:
$I                k = tl.load(k_ptrs)
$I                v = tl.load(v_ptrs)
$I            else:
$I                k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
$I                v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
$I        if UPCAST:
$I            k = k.to(tl.float32)
$I            v = v.to(tl.float32)
$I        qk = tl.dot(q, tl.trans(k)$prec)
$I        kv_idx = offs_n[None, :]
$softmax$I        l_i = l_i * alpha + tl.sum(p, 1)
$I        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None]$prec)
$I        m_i = m_new
"""


def fp_fusion(dtype: torch.dtype) -> dict[str, bool]:
    """Launch options: float32 kernels are compiled without fused multiply-adds.

    The backward recomputes ``P = exp2(s * log2(e) - lse2)`` from the forward's lse. The
    forward rounds ``s * log2(e)`` before subtracting wherever a select sits in between
    (masked tiles, ragged edges), and a fused multiply-add in the backward does not round
    it; where scores are large (``|s|`` in the hundreds) the two then differ by about an
    ulp of ``s`` per element, which shows in fp32 gradients (a relative error of about
    1e-3 in an ALiBi slope's gradient with biases near 150, on an H200). Rounding every
    product, as the interpreter does, makes both sides agree. Low-precision kernels keep
    fused multiply-adds: their rounding of P to bf16/fp16 dominates, and the forward's
    exponent on full tiles is one multiply-add. The choice is always explicit: Triton 3.9
    warns that its default (on) turns off in 3.10."""
    return {"enable_fp_fusion": dtype != torch.float32}


def dot_precision(dtype: torch.dtype) -> str:
    """Extra ``tl.dot`` argument: exact fp32 products unless TF32 is allowed by torch."""
    if dtype != torch.float32 or interpreter_on():
        return ""
    if torch.backends.cuda.matmul.allow_tf32:
        return ', input_precision="tf32"'
    return ', input_precision="ieee"'


def _indent_lines(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(True))


def render_params(names: list[str]) -> str:
    return "".join(f"    {n},\n" for n in names)


def _fwd_loop(
    score_code: Any, mask_code: Any, partial: bool, extra_indent: str, prec: str, sik: str
) -> str:
    ind = "        " + extra_indent
    if _is_identity(score_code):  # one multiply: scores go straight to log2 units
        score_body = f"{ind}s2 = qk * qk_scale\n"
        scaled = "s2"
    else:
        score_body = f"{ind}s = qk * scale\n" + score_code.fwd_body(
            out="s2", score="s", b="b", h="h", q="q_idx", kv="kv_idx", indent=ind
        )
        scaled = "s2 * LOG2E"
    bounds = "n_ok[None, :]"
    if partial:
        mask_part = mask_code.fwd_body(
            out="mk", score=None, b="b", h="h", q="q_idx", kv="kv_idx", indent=ind
        )
        mask_part += (
            f"{ind}if EVEN_N:\n{ind}    keep = mk\n{ind}else:\n{ind}    keep = mk & {bounds}\n"
            f'{ind}s2 = tl.where(keep, {scaled}, float("-inf"))\n'
        )
    else:
        mask_part = f"{ind}if EVEN_N:\n{ind}    s2 = {scaled}\n{ind}else:\n"
        mask_part += f'{ind}    s2 = tl.where({bounds}, {scaled}, float("-inf"))\n'
    generic = score_body + mask_part + (
        f"{ind}m_new = tl.maximum(m_i, tl.max(s2, 1))\n"
        f'{ind}m_use = tl.where(m_new == float("-inf"), 0.0, m_new)\n'
        f"{ind}alpha = tl.exp2(m_i - m_use)\n"
        f"{ind}p = tl.exp2(s2 - m_use[:, None])\n"
    )
    if partial or not _is_identity(score_code):
        softmax = generic
    else:
        # full tiles of plain scores: every score is finite, so the running max is too and
        # needs no -inf guard; with a positive scale the max is taken before scaling and
        # each exponent is one multiply-add (fused where fp_fusion allows). A ragged last
        # tile (not EVEN_N) may hold sub-tiles past S, whose rows see nothing: the generic
        # form
        sub = ind + "    "
        softmax = (
            f"{ind}if EVEN_N and POS_SCALE:\n"
            f"{sub}m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)\n"
            f"{sub}alpha = tl.exp2(m_i - m_new)\n"
            f"{sub}p = tl.exp2(qk * qk_scale - m_new[:, None])\n"
            f"{ind}else:\n" + _indent_lines(generic, "    ")
        )
    return Template(_LOOP).substitute(I=extra_indent, prec=prec, softmax=softmax, sik=sik)


def _is_identity(score_code: Any) -> bool:
    """True for the ``score_mod=None`` stand-in (the score passes unchanged)."""
    from ._render import NoScoreMod

    return getattr(score_code, "key", None) == NoScoreMod.key


def render_fwd(score_code: Any, mask_code: Any, dtype: torch.dtype) -> str:
    prec = dot_precision(dtype)
    params = render_params(list(score_code.params) + list(mask_code.params))
    return Template(_HEADER).substitute(
        family="flex_fwd", log2e=repr(LOG2E), ln2=repr(LN2)
    ) + Template(_FWD).substitute(
        params=params,
        partial_loop=_fwd_loop(score_code, mask_code, True, "", prec, "s_ik"),
        full_loop=_fwd_loop(score_code, mask_code, False, "    ", prec, "s_fik"),
    )


def get_kernel(score_code: Any, mask_code: Any, dtype: torch.dtype) -> Any:
    """The jitted forward kernel for this pair of mods (rendered once per structure)."""
    key = ("flex_fwd", 4, score_code.key, mask_code.key, str(dtype), dot_precision(dtype))
    mod = load_rendered("flex_fwd", key, lambda: render_fwd(score_code, mask_code, dtype))
    return mod.flex_fwd_kernel


def index_args(
    num: torch.Tensor | None,
    idx: torch.Tensor | None,
    B: int,
    H: int,
    fallback: tuple[torch.Tensor, torch.Tensor],
) -> list:
    """Pointers and strides of a (num_blocks [Bm,Hm,n], indices [Bm,Hm,n,k]) pair; broadcast
    batch/head dims get stride 0."""
    if num is None or idx is None:
        num, idx = fallback
    n = num.expand(B, H, num.shape[-1])
    i = idx.expand(B, H, idx.shape[-2], idx.shape[-1])
    return [num, idx, *n.stride(), *i.stride()]


def tma_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, e_pad: int,
                    ev_pad: int) -> tuple[Any, Any] | None:
    """Host tensor descriptors of k ``[B, Hkv, S, E]`` and v over ``[1, 1, block_n, pad]``
    boxes, or None where the tensors do not qualify: a CUDA device of compute capability 9
    or more (the interpreter also takes them, for tests), fp16/bf16 (fp32 too in the
    interpreter), a contiguous last dim, 16-byte aligned bases and strides, head dims a
    multiple of 16 bytes and padded ones of at most 128."""
    td = descriptor_type()
    if td is None or max(e_pad, ev_pad) > 128:
        return None
    interp = interpreter_on()
    ok_dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if interp else ())
    if k.dtype not in ok_dtypes or v.dtype != k.dtype:
        return None
    if not interp and (
        k.device.type != "cuda" or torch.cuda.get_device_capability(k.device)[0] < 9
    ):
        return None
    size = k.element_size()
    for t in (k, v):
        st = t.stride()
        if (
            st[3] != 1
            or t.data_ptr() % 16
            or any(x * size % 16 for x in st[:3])
            or t.shape[3] * size % 16
        ):
            return None
    return (td(k, list(k.shape), list(k.stride()), [1, 1, block_n, e_pad]),
            td(v, list(v.shape), list(v.stride()), [1, 1, block_n, ev_pad]))


def needs_int64(*pairs: tuple[int, int]) -> bool:
    """True if some ``size * stride`` inside one (b, h) slice can pass 2**31."""
    return any(size * abs(stride) >= 2**31 - 1 for size, stride in pairs)


def launch(
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
    q_block: int,
    kv_block: int,
    cfg: FwdConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. q ``[B,Hq,L,E]``, k ``[B,Hkv,S,E]``, v ``[B,Hkv,S,Ev]``
    (last dim contiguous not required but recommended); returns out ``[B,Hq,L,Ev]`` in
    q's dtype, stored in q's memory order, and lse ``[B,Hq,L]`` fp32."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    check_grid(B, H)
    out = empty_like_query(q, Ev)  # q's memory order (as torch's flex_attention)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if L == 0:
        return out, lse
    kernel = get_kernel(score_code, mask_code, q.dtype)
    has_full = full_num is not None and full_idx is not None
    big = needs_int64((L, q.stride(2)), (S, k.stride(2)), (S, v.stride(2)), (L, out.stride(2)))
    grid = (math.ceil(L / cfg.BLOCK_M), H, B)
    e_pad, ev_pad = max(16, next_pow2(E)), max(16, next_pow2(Ev))
    descs = tma_descriptors(k, v, cfg.BLOCK_N, e_pad, ev_pad) if cfg.tma else None
    args = [
        q,
        k,
        v,
        out,
        lse,
        *((k, v) if descs is None else descs),  # unused without TMA
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *index_args(kv_num, kv_idx, B, H, (kv_num, kv_idx)),
        *index_args(full_num, full_idx, B, H, (kv_num, kv_idx)),
        H,
        L,
        S,
        H // Hkv,
        float(scale),
        *score_code.runtime_args(),
        *mask_code.runtime_args(),
    ]
    launcher_for(kernel)(
        grid,
        tuple(args),
        dict(
            E=E,
            EV=Ev,
            E_PAD=e_pad,
            EV_PAD=ev_pad,
            BLOCK_M=cfg.BLOCK_M,
            BLOCK_N=cfg.BLOCK_N,
            Q_BLOCK=q_block,
            KV_BLOCK=kv_block,
            HAS_FULL=has_full,
            UPCAST=interpreter_on(),
            BIG=big,
            EVEN_M=L % cfg.BLOCK_M == 0,
            EVEN_N=S % kv_block == 0,  # every kv sub-tile of a listed kv-block lies inside S
            EVEN_D=E == e_pad and Ev == ev_pad,
            POS_SCALE=scale > 0,
            TMA=descs is not None,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **fp_fusion(q.dtype),
        ),
    )
    return out, lse
