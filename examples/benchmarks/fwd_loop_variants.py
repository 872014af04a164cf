"""Variants of the forward kernel's inner loop on Hopper, as standalone Triton kernels.

    python examples/benchmarks/fwd_loop_variants.py      # on a CUDA machine (sm_90)

The prompt's causal attention of the end-to-end generation benchmark: [8, 16, 2,048, 128]
queries against 8 kv heads, bf16, with no BlockMask (off-band tiles unmasked, the on-band
tile masked, as the library does with full and partial tiles). Each variant runs at a few
(BLOCK_M, BLOCK_N, warps, stages) configs, is checked against fp32 sdpa and timed over 10
back-to-back launches per CUDA-event pair, beside sdpa on cuDNN and on flash:

* A: pointer loads, the library's softmax before 14323af (scale, then max, -inf guard);
* B: pointer loads, row max taken before scaling and one fused multiply-add per exponent;
* C: K and V loaded through host-side tensor descriptors (TMA), softmax as B;
* D: C with ``warp_specialize=True`` loops; E: B with them;
* F: B with the on-band tile first (the library's order: partial tiles, then full);
* G: B with the off-band tiles' indices loaded from an index tensor (the library's
  block-sparse walk); H: G with the on-band tile first; I: H with TMA loads.

``--variants B,G,H`` runs only those; ``--library`` adds the library's kernel at each config,
with pointer and with TMA loads; ``--bisect`` times the library's own rendered kernel with edits
that move it toward G, one at a time and all together (``EDITS``; "inloop" instead restores
the tile-index load of the library before session 10's prefetch).

What it found (BENCHMARKS.md, sessions 8-10) decided the forward defaults and the prefetched
tile index; it is not a test.
"""
import itertools
import sys

import torch
import triton
import triton.language as tl
from prefill_profile import _events_ms  # this folder: the same CUDA-event timer
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception as e:  # noqa: BLE001
    TensorDescriptor = None
    print("no TensorDescriptor", e)


@triton.jit
def _tile(q, k_t, v, acc, m_i, l_i, qk_scale, offs_m, start_n, offs_n,
          MASKED: tl.constexpr, FMA: tl.constexpr):
    qk = tl.dot(q, k_t)
    if FMA:
        if MASKED:
            keep = offs_m[:, None] >= (start_n + offs_n[None, :])
            s = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    else:
        s2 = qk * qk_scale
        if MASKED:
            keep = offs_m[:, None] >= (start_n + offs_n[None, :])
            s2 = tl.where(keep, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s2 - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _kv(k_base, v_base, DK, DV, row0, start_n, offs_n, offs_d, s_kn, s_vn,
        TMA: tl.constexpr):
    if TMA:
        k = DK.load([row0 + start_n, 0])
        v = DV.load([row0 + start_n, 0])
    else:
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :])
    return k, v


@triton.jit
def _band(q, k_base, v_base, DK, DV, acc, m_i, l_i, qk_scale, offs_m, offs_n, offs_d, row0,
          s_kn, s_vn, start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          TMA: tl.constexpr, FMA: tl.constexpr, WS: tl.constexpr):
    for start_n in tl.range(start_m, start_m + BLOCK_M, BLOCK_N, warp_specialize=WS):
        k, v = _kv(k_base, v_base, DK, DV, row0, start_n, offs_n, offs_d, s_kn, s_vn, TMA)
        acc, m_i, l_i = _tile(q, tl.trans(k), v, acc, m_i, l_i, qk_scale, offs_m, start_n,
                              offs_n, True, FMA)
    return acc, m_i, l_i


@triton.jit
def fwd_kernel(Q, K, V, O, LSE, DK, DV,
               s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
               H, HKV, L, scale, IDX,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               TMA: tl.constexpr, FMA: tl.constexpr, WS: tl.constexpr, REV: tl.constexpr,
               IND: tl.constexpr, DIAG_FIRST: tl.constexpr):
    pid_m = tl.program_id(0)
    if REV:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    hkv = h // (H // HKV)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + offs_m[:, None] * s_qm
                + offs_d[None, :])
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    k_base = K + b.to(tl.int64) * s_kb + hkv.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + hkv.to(tl.int64) * s_vh
    row0 = (b * HKV + hkv) * L
    # off-band: [0, start_m), on-band: [start_m, start_m + BLOCK_M); DIAG_FIRST: on-band
    # first (the library's order: partial tiles, then full); IND: the off-band tiles'
    # indices loaded from IDX (the library's block-sparse walk), else an affine loop
    if DIAG_FIRST:
        acc, m_i, l_i = _band(q, k_base, v_base, DK, DV, acc, m_i, l_i, qk_scale, offs_m,
                              offs_n, offs_d, row0, s_kn, s_vn, start_m, BLOCK_M, BLOCK_N,
                              TMA, FMA, WS)
    if IND:
        for it in tl.range(0, start_m // BLOCK_N, warp_specialize=WS):
            start_n = tl.load(IDX + it) * BLOCK_N
            k, v = _kv(k_base, v_base, DK, DV, row0, start_n, offs_n, offs_d, s_kn, s_vn,
                       TMA)
            acc, m_i, l_i = _tile(q, tl.trans(k), v, acc, m_i, l_i, qk_scale, offs_m,
                                  start_n, offs_n, False, FMA)
    else:
        for start_n in tl.range(0, start_m, BLOCK_N, warp_specialize=WS):
            k, v = _kv(k_base, v_base, DK, DV, row0, start_n, offs_n, offs_d, s_kn, s_vn,
                       TMA)
            acc, m_i, l_i = _tile(q, tl.trans(k), v, acc, m_i, l_i, qk_scale, offs_m,
                                  start_n, offs_n, False, FMA)
    if not DIAG_FIRST:
        acc, m_i, l_i = _band(q, k_base, v_base, DK, DV, acc, m_i, l_i, qk_scale, offs_m,
                              offs_n, offs_d, row0, s_kn, s_vn, start_m, BLOCK_M, BLOCK_N,
                              TMA, FMA, WS)
    out = acc / l_i[:, None]
    tl.store(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + offs_m[:, None] * s_om
             + offs_d[None, :], out.to(O.dtype.element_ty))
    tl.store(LSE + (b * H + h).to(tl.int64) * L + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453)


_IDS: dict = {}


def _tile_ids(n, device):
    if n not in _IDS:
        _IDS[n] = torch.arange(n, device=device, dtype=torch.int32)
    return _IDS[n]


def run(q, k, v, cfg, tma, fma, ws, rev=False, ind=False, diag_first=False):
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    bm, bn, w, s = cfg
    out = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    if tma:
        dk = TensorDescriptor.from_tensor(k.reshape(-1, D), [bn, D])
        dv = TensorDescriptor.from_tensor(v.reshape(-1, D), [bn, D])
    else:
        dk = dv = k
    fwd_kernel[(L // bm, H, B)](
        q, k, v, out, lse, dk, dv, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), H, Hkv, L, D**-0.5,
        _tile_ids(L // bn, q.device),
        D=D, BLOCK_M=bm, BLOCK_N=bn, TMA=tma, FMA=fma, WS=ws, REV=rev, IND=ind,
        DIAG_FIRST=diag_first,
        num_warps=w, num_stages=s)
    return out


# --bisect: the library's own rendered kernel with edits that move it toward G, each valid
# for this harness's causal mask only (Q_BLOCK == KV_BLOCK, one diagonal block per row)
_FULL = "    if HAS_FULL:\n        nb = tl.load(FKV_NUM + b * s_fnb + h * s_fnh + qblk * s_fnq)\n"
EDITS = {
    # the full loop's trip count computed (G's), not loaded
    "count": [(_FULL, "    if HAS_FULL:\n        nb = qblk\n")],
    # the full loop's tiles affine (B's), not loaded from the index list
    "affine": [("            kvblk = nxt  # prefetched: see the note above _LOOP\n",
                "            kvblk = it // SUBS\n")],
    # the full loop's tile index loaded in the step that uses it (the library before the
    # prefetch: Triton then drains every K/V copy in flight at each step)
    "inloop": [("            kvblk = nxt  # prefetched: see the note above _LOOP\n",
                "            kvblk = tl.load(idx_base + (it // SUBS) * s_fik)\n")],
    # the diagonal tile's softmax without the guard for rows that see nothing
    "noguard": [('        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)\n',
                 "        m_use = m_new\n")],
    # the standalone kernels' epilogue: no guard for rows that see nothing
    "epilogue": [("    seen = l_i > 0.0\n    l_safe = tl.where(seen, l_i, 1.0)\n",
                  "    seen = l_i > 0.0\n    l_safe = l_i\n"),
                 ('    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))\n',
                  "    lse = (m_i + tl.log2(l_safe)) * LN2\n")],
}


def _swap_loops(src):
    """Full tiles first: the partial loop's block moved after the full loop's."""
    a = src.index("    nb = tl.load(KV_NUM")
    b = src.index("    if HAS_FULL:\n        nb = ")
    c = src.index("    seen = l_i > 0.0")
    return src[:a] + src[b:c] + src[a:b] + src[c:]


def _edited(src, names):
    for name in names:
        if name == "swap":
            src = _swap_loops(src)
            continue
        for old, new in EDITS[name]:
            if old not in src:
                raise RuntimeError(f"edit {name}: the rendered kernel has changed")
            src = src.replace(old, new)
    return src


def _variant_getter(flex_fwd, path, names):
    """A stand-in for ``flex_fwd.get_kernel``: the rendered kernel with ``names`` applied,
    written to ``path`` and imported on first use."""
    import importlib.util

    cache = []

    def get_kernel(score_code, mask_code, dtype):
        if not cache:
            with open(path, "w") as f:
                f.write(_edited(flex_fwd.render_fwd(score_code, mask_code, dtype), names))
            spec = importlib.util.spec_from_file_location(path.rsplit("/", 1)[-1][:-3], path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            cache.append(mod.flex_fwd_kernel)
        return cache[0]

    return get_kernel


def bisect_library(q, k, v, ref, cfg, timer=None):
    """Time the library's kernel with each edit alone and all together (same harness);
    ``timer`` (default ``_events_ms``) takes the call; a CPU check passes ``lambda f: 0``."""
    import tempfile

    from hf_flexattn.kernels import flex_fwd

    import hf_flexattn

    L = q.shape[2]
    bm = hf_flexattn.create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L,
                                       device=q.device)
    opts = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg), backend="triton")
    timer = timer or _events_ms
    original = flex_fwd.get_kernel
    toward_g = tuple(n for n in EDITS if n != "inloop")
    combos = [()] + [(n,) for n in EDITS] + [("swap",), toward_g, toward_g + ("swap",)]
    tmp = tempfile.mkdtemp()
    try:
        for i, names in enumerate(combos):
            flex_fwd.get_kernel = _variant_getter(flex_fwd, f"{tmp}/bisect_{i}.py", names)
            f = lambda: hf_flexattn.flex_attention(  # noqa: E731
                q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts)
            err = (f().float() - ref).abs().max().item()
            label = "+".join(names) or "as rendered"
            print(f"bisect {label:36s} {cfg} {timer(f):.3f} ms err {err:.4f}", flush=True)
    finally:
        flex_fwd.get_kernel = original


def main():
    torch.manual_seed(0)
    B, H, Hkv, L, D = 8, 16, 8, 2048, 128
    dt = torch.bfloat16
    q = torch.randn(B, L, H, D, device="cuda", dtype=dt).transpose(1, 2)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1),
        is_causal=True)
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(be):
            f = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                q, k, v, is_causal=True, enable_gqa=True)
            print(f"sdpa {be.name:20s} {_events_ms(f):.3f} ms", flush=True)
    cfgs = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3),
            (128, 64, 4, 4), (64, 64, 4, 3), (128, 128, 4, 2)]
    variants = {  # name: (tma, fma, ws, ind, diag_first)
        "A ptr ours": (False, False, False, False, False),
        "B ptr fma": (False, True, False, False, False),
        "C tma fma": (True, True, False, False, False),
        "D tma fma ws": (True, True, True, False, False),
        "E ptr fma ws": (False, True, True, False, False),
        "F B diag-first": (False, True, False, False, True),
        "G B indexed": (False, True, False, True, False),
        "H B indexed diag-first": (False, True, False, True, True),
        "I C indexed diag-first": (True, True, False, True, True),
    }
    pick = sys.argv[sys.argv.index("--variants") + 1].split(",") if "--variants" in sys.argv \
        else None
    if pick:  # by letter: --variants B,F,G (then three configs)
        cfgs = [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)]
        variants = {n: v for n, v in variants.items() if n.split()[0] in pick}
    if TensorDescriptor is None:
        variants = {n: v for n, v in variants.items() if not v[0]}
    if "--library" in sys.argv:  # the library's kernel in the same harness and layout
        import hf_flexattn

        bm = hf_flexattn.create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L,
                                           device="cuda")
        fields = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
        for cfg, tma in itertools.product(cfgs, (False, True)):
            opts = dict(zip(fields, cfg), tma=tma)
            f = lambda: hf_flexattn.flex_attention(  # noqa: E731
                q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts)  # noqa: B023
            err = (f().float() - ref).abs().max().item()
            print(f"{'library tma=' + str(tma):24s} {cfg} {_events_ms(f):.3f} ms err {err:.4f}"
                  f" (unqueued: {_events_ms(f, queue=False):.3f} ms, triton do_bench: "
                  f"{triton.testing.do_bench(f, return_mode='median'):.3f} ms)", flush=True)
    if "--bisect" in sys.argv:
        for cfg in cfgs:
            bisect_library(q, k, v, ref, cfg)
    for (name, flags), cfg in itertools.product(variants.items(), cfgs):
        try:
            o = run(q, k, v, cfg, *flags)
            torch.cuda.synchronize()
            err = (o.float() - ref).abs().max().item()
            ms = _events_ms(lambda: run(q, k, v, cfg, *flags))  # noqa: B023
            print(f"{name:24s} {cfg} {ms:.3f} ms err {err:.4f}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name:24s} {cfg} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
