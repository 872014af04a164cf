"""The mod compiler: generated Triton code (run under TRITON_INTERPRET=1) against torch.

Every construct is checked by running the code of ``compile_mod`` inside a tiny test kernel
over a ``(b, h, q, kv)`` grid with ragged edge tiles and comparing with
``hf_flexattn._mod_eval.eval_mask_mod`` / ``eval_score_mod`` (torch's vmap semantics);
backward code is compared with ``torch.autograd`` on ``eval_score_mod``.

Run with ``TRITON_INTERPRET=1`` in the environment when no GPU is present (tests/conftest.py
sets it before triton is imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile

# conftest.py turns the interpreter on when there is no GPU; setting it here too would switch
# every kernel rendered later in a GPU session to the interpreter
import pytest  # noqa: E402
import torch  # noqa: E402

from hf_flexattn import compiler  # noqa: E402
from hf_flexattn._mod_eval import eval_mask_mod, eval_score_mod  # noqa: E402
from hf_flexattn.block_mask import and_masks, noop_mask, or_masks  # noqa: E402
from hf_flexattn.compiler import CapturedSpec, UnsupportedModError, compile_mod  # noqa: E402

B, H, M, N = 2, 3, 21, 27  # ragged against 16 x 16 tiles
BM = BN = 16
_INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cpu" if _INTERP else ("cuda" if torch.cuda.is_available() else "cpu")

needs_triton = pytest.mark.skipif(
    not _INTERP and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (set before triton is imported) or a GPU",
)
kernel_test = [pytest.mark.interpreter, needs_triton]

# ---------------------------------------------------------------------------------------------
# test harness: render a kernel around the generated code, import it, launch it
# ---------------------------------------------------------------------------------------------
_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def kern(out_ptr, score_ptr, gout_ptr, gscore_ptr, H, M, N, PM, PN,
         {params}BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
{tiles}
    valid = (q < M) & (kv < N)
    # padded [B*H, PM, PN] layout: edge tiles are stored whole, for the bounds checks
    base = bh * PM * PN + q * PN + kv
    score = tl.load(score_ptr + base)
{fwd}
    tl.store(out_ptr + base, {store})
{bwd}
"""
_TILES = {
    False: "    q = offs_m[:, None]\n    kv = offs_n[None, :]",
    True: "    q = offs_m[None, :]\n    kv = offs_n[:, None]",  # [BN, BM] tiles (dK/dV kernel)
}
_BWD = """    grad_out = tl.load(gout_ptr + base)
{body}
    tl.store(gscore_ptr + base, grad_score)
"""
_TMP = tempfile.mkdtemp(prefix="hf_flexattn_test_compiler_")
_KERNELS: dict[str, object] = {}


def _load_kernel(src: str):
    digest = hashlib.sha1(src.encode()).hexdigest()[:16]
    if digest in _KERNELS:
        return _KERNELS[digest]
    path = os.path.join(_TMP, f"k_{digest}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"_hf_flexattn_k_{digest}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    _KERNELS[digest] = mod.kern
    return mod.kern


def run_mod(fn, kind, score=None, gout=None, grads=False, transposed=False):
    """Run a mod's generated code over [B, H, M, N] (padded to whole tiles).

    ``transposed``: emit and run the code for ``[BN, BM]`` tiles (q ``[1, BM]``, kv
    ``[BN, 1]``); the results are stored in the same ``[B, H, PM, PN]`` layout.
    Returns (out [B,H,PM,PN], grad_score or None, grad buffers, ModCode).
    """
    prefix = "sm_" if kind == "score" else "mm_"
    mc = compile_mod(fn, kind, prefix=prefix)
    PM, PN = triton_cdiv(M, BM) * BM, triton_cdiv(N, BN) * BN
    params = "".join(p + ", " for p in mc.params + (mc.grad_params if grads else []))
    fwd = mc.fwd_body(
        out="out",
        score="score" if kind == "score" else None,
        b="b",
        h="h",
        q="q",
        kv="kv",
        indent="    ",
        transposed=transposed,
    )
    store = "out.to(tl.float32)" if kind == "score" else "out.to(tl.int8)"
    bwd = ""
    if grads:
        body = mc.bwd_body(
            grad_score="grad_score",
            grad_out="grad_out",
            score="score",
            b="b",
            h="h",
            q="q",
            kv="kv",
            valid="valid",
            indent="    ",
            transposed=transposed,
        )
        bwd = _BWD.format(body=body.rstrip("\n"))
    src = _KERNEL.format(
        params=params, tiles=_TILES[transposed], fwd=fwd.rstrip("\n"), store=store, bwd=bwd
    )
    kern = _load_kernel(src)
    sc = torch.zeros(B, H, PM, PN, device=DEV)
    if score is not None:
        sc[:, :, :M, :N] = score
    go = torch.zeros(B, H, PM, PN, device=DEV)
    if gout is not None:
        go[:, :, :M, :N] = gout
    out = torch.zeros(
        B, H, PM, PN, device=DEV, dtype=torch.float32 if kind == "score" else torch.int8
    )
    gsc = torch.zeros(B, H, PM, PN, device=DEV)
    gbufs = mc.grad_buffers() if grads else []
    grid = (PM // BM, PN // BN, B * H)
    kern[grid](out, sc, go, gsc, H, M, N, PM, PN, *mc.runtime_args(), *gbufs, BM=BM, BN=BN)
    return out, (gsc if grads else None), gbufs, mc


def triton_cdiv(a, b):
    return (a + b - 1) // b


def idx():
    return (
        torch.arange(B, device=DEV),
        torch.arange(H, device=DEV),
        torch.arange(M, device=DEV),
        torch.arange(N, device=DEV),
    )


def check_mask(fn, transposed=False):
    out, _, _, mc = run_mod(fn, "mask", transposed=transposed)
    ref = eval_mask_mod(fn, *idx())
    got = out[:, :, :M, :N].bool()
    bad = (got != ref).nonzero()
    assert bad.numel() == 0, f"{len(bad)} mismatches, first at {bad[:3].tolist()}\n{mc!r}"
    return out


def check_score(fn, score=None, rtol=1.3e-6, atol=1e-5, transposed=False):
    if score is None:
        score = _scores()
    out, _, _, mc = run_mod(fn, "score", score=score, transposed=transposed)
    ref = eval_score_mod(fn, score, *idx()).to(torch.float32)
    torch.testing.assert_close(
        out[:, :, :M, :N],
        ref.expand(B, H, M, N),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
        msg=lambda m: f"{m}\n{mc!r}",
    )
    return out


def _scores(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, M, N, generator=g) * scale).to(DEV)


def check_grads(fn, params, score=None, rtol=1e-5, atol=1e-5, transposed=False):
    """Compare grad_score and the captured tensors' grads with torch.autograd."""
    if score is None:
        score = _scores(1)
    g = torch.Generator().manual_seed(7)
    gout = torch.randn(B, H, M, N, generator=g).to(DEV)
    out, gsc, gbufs, mc = run_mod(
        fn, "score", score=score, gout=gout, grads=True, transposed=transposed
    )
    s = score.clone().requires_grad_(True)
    for p in params:
        p.grad = None
    ref = eval_score_mod(fn, s, *idx())
    ref.backward(gout.expand_as(ref))
    torch.testing.assert_close(out[:, :, :M, :N], ref.detach().float(), rtol=rtol, atol=atol)
    exp_gs = s.grad if s.grad is not None else torch.zeros_like(s)
    torch.testing.assert_close(
        gsc[:, :, :M, :N], exp_gs, rtol=rtol, atol=atol, msg=lambda m: f"grad_score: {m}\n{mc!r}"
    )
    want = [t for t, sp in zip(mc.captured, mc.specs) if sp.needs_grad]
    assert len(want) == len(gbufs)
    by_id = {id(p): p for p in params}
    for t, gb in zip(want, gbufs):
        p = by_id[id(t)]
        exp = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(
            gb, exp.float(), rtol=rtol, atol=atol, msg=lambda m: f"capture grad: {m}\n{mc!r}"
        )
    return mc


# ---------------------------------------------------------------------------------------------
# mask mods
# ---------------------------------------------------------------------------------------------
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _sliding(w):
    def sliding(b, h, q_idx, kv_idx):
        return causal(b, h, q_idx, kv_idx) & ((q_idx - kv_idx).abs() <= w)

    return sliding


def _doc_ids(n, dtype=torch.int64):
    g = torch.Generator().manual_seed(n)
    lens = torch.randint(1, 7, (n,), generator=g)
    ids = torch.repeat_interleave(torch.arange(n), lens)[:n]
    return ids.to(dtype).to(DEV)


DOC = _doc_ids(max(M, N))
DOC32 = DOC.to(torch.int32)
OFFSETS = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(DOC.cpu()).cumsum(0)]).to(DEV)


def document(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


def document32(b, h, q_idx, kv_idx):
    return DOC32[q_idx] == DOC32[kv_idx]


def doc_prefix(b, h, q_idx, kv_idx):  # nested gather: offsets[doc[q]]
    return (
        (kv_idx >= OFFSETS[DOC[q_idx]])
        & (kv_idx < OFFSETS[DOC[q_idx] + 1])
        & (kv_idx - OFFSETS[DOC[kv_idx]] <= q_idx - OFFSETS[DOC[q_idx]])
    )


IMAGE_ID = torch.tensor([0, 0, 1, 1, 1, 2, 2] * 4)[:N].to(DEV)
INTERVALS = torch.tensor([[0, 5], [3, 12], [10, 30]]).to(DEV)


def image_rows(b, h, q_idx, kv_idx):  # partial indexing chain, then row[0], row[1]
    row = INTERVALS[IMAGE_ID[kv_idx]]
    return (q_idx >= row[0]) & (q_idx < row[1])


PREFIX = torch.tensor([3, 9]).to(DEV)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx <= PREFIX[b]) | (q_idx >= kv_idx)


ALLOWED = (torch.rand(H, 4, generator=torch.Generator().manual_seed(3)) > 0.4).to(DEV)
M4 = (torch.rand(B, H, M, N, generator=torch.Generator().manual_seed(4)) > 0.5).to(DEV)
U8 = torch.randint(0, 256, (M,), generator=torch.Generator().manual_seed(5), dtype=torch.uint8).to(
    DEV
)
I8 = torch.randint(
    -128, 128, (N,), generator=torch.Generator().manual_seed(6), dtype=torch.int8
).to(DEV)
LENS = torch.tensor([4, 9, 17]).to(DEV)


def helper(x, y):
    return (x - y) // 3


def _inplace_mask(b, h, q_idx, kv_idx):
    x = q_idx - kv_idx
    x += 2
    x *= 3
    return x > 4


MASKS = {
    "causal": causal,
    "sliding": _sliding(5),
    "document": document,
    "document32": document32,
    "doc_prefix": doc_prefix,
    "image_rows": image_rows,
    "prefix_lm": prefix_lm,
    "floor_div": lambda b, h, q, kv: ((q - kv) // 3) % 2 == 0,
    "neg_divisor": lambda b, h, q, kv: (q - kv) % -3 == -1,
    "div_modes": lambda b, h, q, kv: (
        (torch.div(q - kv, 4, rounding_mode="floor") + torch.div(kv - q, 3, rounding_mode="trunc"))
        % 2
        == 1
    ),
    "remainder_tensor": lambda b, h, q, kv: torch.remainder(q - 10, kv + 1) < kv // 2,
    "fmod": lambda b, h, q, kv: torch.fmod(q - kv, 4) == -1,
    "var_divisor": lambda b, h, q, kv: (q - 13) // (kv - 11).clamp(min=1) > (kv - 20) % (h + 2),
    "bitwise": lambda b, h, q, kv: (((q ^ kv) & 3) == 0) | (((q << 2) >> 3) == (~kv & 7)),
    "bitwise_or": lambda b, h, q, kv: (q | kv) > 17,
    "int64_wide": lambda b, h, q, kv: ((q * 1_000_000_007 + kv * 2**40) % 7) < 3,
    "int64_shift": lambda b, h, q, kv: ((q << 33) >> 32) + kv > 40,
    "int32_casts": lambda b, h, q, kv: (q.int() - kv.to(torch.int32)).long() * 3 > h.int(),
    "neg_index": lambda b, h, q, kv: kv < LENS[-1] - q,
    "wrapped_index": lambda b, h, q, kv: kv < LENS[(q % 5) - 3] + 2,
    "bool_table": lambda b, h, q, kv: ALLOWED[h, kv % 4],
    "table_4d": lambda b, h, q, kv: M4[b, h, q, kv],
    "uint8_wrap": lambda b, h, q, kv: (U8[q] + 200) < 100 + kv,
    "int8": lambda b, h, q, kv: I8[kv] * 2 > q.to(torch.int8) - 60,
    "logical": lambda b, h, q, kv: (
        torch.logical_or(torch.logical_and(q > 3, kv < 20), torch.logical_not(q != kv)) ^ (h == 1)
    ),
    "invert": lambda b, h, q, kv: ~(q < kv) & ~(b == 1),
    "noop": noop_mask,
    "and_or": and_masks(causal, or_masks(document, _sliding(2)), lambda b, h, q, kv: kv > 0),
    "or_empty": or_masks(),
    "helper_fn": lambda b, h, q, kv: helper(q, kv) == helper(kv, q) + 1,
    "where_int": lambda b, h, q, kv: torch.where(q > kv, q - kv, kv - q) < 3 + h,
    "float_cmp": lambda b, h, q, kv: (q.float() / 3.0).floor() == kv.float().sqrt().floor(),
    "const_tensor": lambda b, h, q, kv: (q - kv) < torch.tensor(4) * 2,
    "new_tensor": lambda b, h, q, kv: q.new_tensor(5) + kv.new_ones(()) > q,
    "min_max": lambda b, h, q, kv: torch.minimum(q, kv + 3) > torch.maximum(kv, h * 4) - 2,
    "sign_abs": lambda b, h, q, kv: torch.sign(q - kv) * (q - kv).abs() > -4,
    "pow_int": lambda b, h, q, kv: (q - kv) ** 2 < 30,
    "clip": lambda b, h, q, kv: (q - kv).clip(-3, 5) + kv.clamp_max(10) == q.clamp_min(7),
    "inplace": _inplace_mask,
    "inner_index_int32": lambda b, h, q, kv: kv >= OFFSETS[DOC32[q]],
}


@pytest.mark.parametrize("transposed", [False, True], ids=["normal", "transposed"])
@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.interpreter
@needs_triton
def test_mask_mod(name, transposed):
    check_mask(MASKS[name], transposed=transposed)


# ---------------------------------------------------------------------------------------------
# score mods
# ---------------------------------------------------------------------------------------------
R = 6
REL_TABLE = torch.randn(H, 2 * R + 1, generator=torch.Generator().manual_seed(8)).to(DEV)
SLOPES = torch.tensor([0.5, 0.25, 0.125]).to(DEV)
BIAS_H = torch.randn(H, generator=torch.Generator().manual_seed(9)).to(DEV)
BIAS64 = torch.randn(H, generator=torch.Generator().manual_seed(10), dtype=torch.float64).to(DEV)
BIAS16 = torch.randn(N, generator=torch.Generator().manual_seed(11)).half().to(DEV)
SCALE0D = torch.tensor(1.5).to(DEV)
TABLE_T = torch.randn(2 * R + 1, H, generator=torch.Generator().manual_seed(12)).to(DEV).t()
ONE = torch.tensor([[0.25]]).to(DEV)  # size-1 dims (specialised to constants on GPUs)


def rel_bias(score, b, h, q_idx, kv_idx):
    return score + REL_TABLE[h, (q_idx - kv_idx).clamp(-R, R) + R]


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (q_idx - kv_idx).abs()


def softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def _half_scores():
    # values on a 0.5 grid (round half to even, floor/ceil/trunc of negatives, ties)
    return torch.round(_scores(2) * 2) / 2


SCORES = {
    "identity": lambda s, b, h, q, kv: s,
    "scale": lambda s, b, h, q, kv: s * 2 - 1,
    "rel_bias": rel_bias,
    "alibi": alibi,
    "softcap": softcap,
    "bias_h": lambda s, b, h, q, kv: s + BIAS_H[h],
    "bias64": lambda s, b, h, q, kv: s + BIAS64[h],
    "bias16": lambda s, b, h, q, kv: s * BIAS16[kv],
    "bias16_arith": lambda s, b, h, q, kv: s + (BIAS16[kv] * 3 + 1),
    "scale0d": lambda s, b, h, q, kv: s * SCALE0D,
    "strided": lambda s, b, h, q, kv: s + TABLE_T[h, (kv - q).clamp(-R, R) + R],
    "size_one": lambda s, b, h, q, kv: s * ONE[0, 0] + ONE[0, -1] + ONE[b // 2, h // 3],
    "int_true_div": lambda s, b, h, q, kv: s + q / 7 - kv / 3,
    "int_mul": lambda s, b, h, q, kv: s * (q - kv) + h,
    "exp_log": lambda s, b, h, q, kv: torch.exp(s / 4) + torch.log(s.abs() + 1),
    "exp2_log2": lambda s, b, h, q, kv: torch.exp2(s / 3) - torch.log2(s * s + 0.5),
    "sigmoid": lambda s, b, h, q, kv: torch.sigmoid(s) * s,
    "sqrt_rsqrt": lambda s, b, h, q, kv: (s.abs() + 0.1).sqrt() + (s * s + 1).rsqrt(),
    "trig": lambda s, b, h, q, kv: torch.sin(s) + torch.cos(s * 0.5),
    "rounding": lambda s, b, h, q, kv: (
        s.floor() * 1000 + s.ceil() * 100 + s.trunc() * 10 + s.round()
    ),
    "sign_abs_neg": lambda s, b, h, q, kv: torch.sign(s) + (-s).abs() * 2,
    "pow_const": lambda s, b, h, q, kv: (
        s**2
        + (s.abs() ** 0.5)
        - s**3 / 10
        + 1 / (s.abs() + 1)
        + (s.abs() + 1) ** -1.5
        + (s.abs() + 0.5) ** 2.5
    ),
    "rpow": lambda s, b, h, q, kv: 2 ** (s / 4) + 3.0 ** (s / 8),
    "pow_tensor": lambda s, b, h, q, kv: (s.abs() + 0.5) ** (kv / 10.0),
    "clamp": lambda s, b, h, q, kv: s.clamp(-1, 2) + s.clamp(min=0.5) - s.clamp(max=-0.5),
    "min_max": lambda s, b, h, q, kv: torch.maximum(s, BIAS_H[h]) + torch.minimum(s, q / 10),
    "float_floordiv_mod": lambda s, b, h, q, kv: (
        (s // 0.7) + (s % 0.7) * 10 + torch.remainder(s, -1.3) + torch.fmod(s, 1.1)
    ),
    "where_inf": lambda s, b, h, q, kv: torch.where(q >= kv, s, -float("inf")),
    "where_scalar": lambda s, b, h, q, kv: torch.where(s > 0, s, 0.1 * s),
    "const_tensors": lambda s, b, h, q, kv: (
        s + torch.tensor(3.0) * s.new_ones(()) + torch.full((), 2.0)
    ),
    "compose": lambda s, b, h, q, kv: softcap(rel_bias(s, b, h, q, kv), b, h, q, kv),
    "bias_only": lambda s, b, h, q, kv: BIAS_H[h] + 0 * q,
    "cast_roundtrip": lambda s, b, h, q, kv: s.half().float() + s.to(torch.int32) + s.double(),
    "relu_square": lambda s, b, h, q, kv: torch.relu(s) + torch.square(s) + torch.erf(s),
}


@pytest.mark.parametrize("transposed", [False, True], ids=["normal", "transposed"])
@pytest.mark.parametrize("name", list(SCORES))
@pytest.mark.interpreter
@needs_triton
def test_score_mod(name, transposed):
    fn = SCORES[name]
    if name in ("rounding", "float_floordiv_mod"):
        check_score(fn, score=_half_scores(), transposed=transposed)
    elif name == "bias64":
        # float64 captures are computed in fp32 (documented): compare at fp32 precision
        check_score(fn, rtol=1e-6, atol=1e-6, transposed=transposed)
    else:
        check_score(fn, transposed=transposed)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
def _param(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(*shape, generator=g) * scale).to(DEV))


def _grad_cases():
    table = _param(H, 2 * R + 1, seed=1)
    slopes = _param(H, seed=2, scale=0.3)
    bias_h = _param(H, seed=3)
    bias_q = _param(M, seed=4)
    bias_kv = _param(N, seed=5)
    full = _param(B, H, M, N, seed=6)
    cap = torch.nn.Parameter(torch.tensor([-1.0, 0.0, 1.5]).to(DEV))
    tie = torch.nn.Parameter(torch.tensor([0.0, 1.0, -1.0]).to(DEV))
    lo = torch.nn.Parameter(torch.tensor(-0.5).to(DEV))
    hi = torch.nn.Parameter(torch.tensor(1.0).to(DEV))
    div = torch.nn.Parameter(
        (torch.rand(H, generator=torch.Generator().manual_seed(7)) + 0.5).to(DEV)
    )
    return {
        "rel_bias": (lambda s, b, h, q, kv: s + table[h, (q - kv).clamp(-R, R) + R], [table]),
        "alibi": (lambda s, b, h, q, kv: s - slopes[h] * (q - kv).abs(), [slopes]),
        "softcap": (softcap, []),
        "bias_h": (lambda s, b, h, q, kv: s + bias_h[h], [bias_h]),
        "bias_q_kv": (lambda s, b, h, q, kv: s * bias_q[q] + bias_kv[kv] ** 2, [bias_q, bias_kv]),
        "bias_full": (lambda s, b, h, q, kv: s + torch.tanh(full[b, h, q, kv]), [full]),
        "unary": (
            lambda s, b, h, q, kv: (
                torch.exp(s / 4)
                + torch.log(s.abs() + 1)
                + torch.sigmoid(s)
                + (s * s + 1).sqrt()
                + (s * s + 1).rsqrt()
                + torch.exp2(s / 5)
                + torch.log2(s.abs() + 2)
                + torch.sin(s)
                - torch.cos(s)
                + torch.erf(s)
                + torch.relu(s)
                + 1 / (s.abs() + 1)
            ),
            [],
        ),
        "pow": (
            lambda s, b, h, q, kv: (
                s**2
                + (s.abs() + 1) ** 1.5
                + s**3 * 0.1
                + 2 ** (s / 3)
                + (s.abs() + 0.5) ** (bias_h[h] + 2)
            ),
            [bias_h],
        ),
        "div_capture": (lambda s, b, h, q, kv: s / div[h] + div[h] / (s.abs() + 1), [div]),
        "where": (
            lambda s, b, h, q, kv: torch.where(q >= kv, s * bias_h[h], -float("inf")),
            [bias_h],
        ),
        "clamp_ties": (
            lambda s, b, h, q, kv: (
                s.clamp(-1, 1)
                + s.clamp(min=0.5)
                + s.clamp(max=-0.5)
                + torch.clamp(s, lo, hi)
                + torch.clamp(s * 0.5, hi, lo)
            ),
            [lo, hi],
        ),
        "max_min_ties": (
            lambda s, b, h, q, kv: (
                torch.maximum(s, tie[h]) * 2 + torch.minimum(s, cap[h]) * 3 + torch.maximum(s, s)
            ),
            [tie, cap],
        ),
        "casts": (
            lambda s, b, h, q, kv: (
                s.double().float() * bias_h[h].double() + (s > 0).float() + s.floor() + s.long()
            ),
            [bias_h],
        ),
        "no_score": (lambda s, b, h, q, kv: bias_q[q] * bias_kv[kv] + 0 * h, [bias_q, bias_kv]),
        "abs_neg": (lambda s, b, h, q, kv: (-s).abs() - bias_h[h].abs() * s, [bias_h]),
    }


GRAD_CASES = list(_grad_cases())


@pytest.mark.parametrize("transposed", [False, True], ids=["normal", "transposed"])
@pytest.mark.parametrize("name", GRAD_CASES)
@pytest.mark.interpreter
@needs_triton
def test_score_mod_backward(name, transposed):
    fn, params = _grad_cases()[name]
    score = _half_scores() if name in ("clamp_ties", "max_min_ties", "casts") else None
    check_grads(fn, params, score=score, transposed=transposed)


# ---------------------------------------------------------------------------------------------
# bounds safety on ragged edge tiles
# ---------------------------------------------------------------------------------------------
@pytest.mark.interpreter
@needs_triton
def test_loads_past_sizes_are_masked():
    # vec is a view inside a larger buffer: unmasked reads past its end would see 1000s
    buf = torch.full((M + 40,), 1000.0, device=DEV)
    buf[:M] = torch.arange(M, dtype=torch.float32)
    vec = buf[:M]
    col = torch.full((N + 40,), 1000.0, device=DEV)
    colv = col[:N]
    colv.zero_()

    def fn(s, b, h, q, kv):
        return s + vec[q] + colv[kv]

    score = _scores()
    out = check_score(fn, score=score)
    PM, PN = out.shape[-2:]
    # padded positions: score is 0 there and the masked loads give 0
    q = torch.arange(PM, device=DEV)[:, None].expand(PM, PN)
    kv = torch.arange(PN, device=DEV)[None, :].expand(PM, PN)
    expect = torch.where(q < M, q.float(), 0.0)
    pad = (q >= M) | (kv >= N)
    torch.testing.assert_close(out[0, 0][pad], expect[pad], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# interface, cache and errors (no kernel launch)
# ---------------------------------------------------------------------------------------------
def _doc_factory(doc, window):
    def doc_window(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx - kv_idx <= window)

    return doc_window


def test_cache_reuses_trace_for_new_closure_values():
    compiler.clear_cache()
    a = compile_mod(_doc_factory(torch.tensor([0, 0, 1]), 4), "mask", prefix="mm_")
    n = compiler.trace_count()
    doc2 = torch.tensor([0, 1, 1, 1, 2, 2, 2])  # other values and size
    b = compile_mod(_doc_factory(doc2, 4), "mask", prefix="mm_")
    assert compiler.trace_count() == n
    assert a.key == b.key and hash(a.key) == hash(b.key)
    assert b.captured[0] is doc2
    assert b.runtime_args() == [doc2, 1, 7]
    assert a.params == ["mm_c0_ptr", "mm_c0_s0", "mm_c0_n0"]
    assert b.specs == [CapturedSpec(torch.int64, 1, False)]
    # a Python constant in the closure is part of the key
    c = compile_mod(_doc_factory(doc2, 5), "mask", prefix="mm_")
    assert compiler.trace_count() == n + 1 and c.key != b.key
    # so are the captured tensors' dtypes
    d = compile_mod(_doc_factory(doc2.int(), 4), "mask", prefix="mm_")
    assert compiler.trace_count() == n + 2 and d.key != b.key
    assert compile_mod(_doc_factory(doc2, 4), "mask", prefix="mm_").key == b.key
    assert compiler.trace_count() == n + 2


def test_cache_requires_grad_and_shape_reads():
    compiler.clear_cache()

    def factory(t):
        return lambda s, b, h, q, kv: s + t[h]

    t1, t2 = torch.randn(3), torch.randn(4, requires_grad=True)
    a = compile_mod(factory(t1), "score", prefix="sm_")
    n = compiler.trace_count()
    b = compile_mod(factory(t2), "score", prefix="sm_")
    assert compiler.trace_count() == n + 1
    assert not a.specs[0].needs_grad and b.specs[0].needs_grad
    assert b.grad_params == ["sm_g0_ptr"] and a.grad_params == []
    assert a.key != b.key

    def last_factory(t):
        return lambda b, h, q, kv: kv < t.shape[0] - 1  # the size is baked into the code

    x = compile_mod(last_factory(torch.zeros(5)), "mask", prefix="mm_")
    y = compile_mod(last_factory(torch.zeros(7)), "mask", prefix="mm_")
    assert x.key != y.key and x.captured == [] and "6" in repr(y)


def test_nested_closures_and_globals_are_found_by_path():
    compiler.clear_cache()
    m1 = and_masks(_doc_factory(torch.tensor([0, 1]), 2), prefix_lm)
    m2 = and_masks(_doc_factory(torch.tensor([0, 0, 1]), 2), prefix_lm)
    k1 = compile_mod(m1, "mask", prefix="mm_")
    n = compiler.trace_count()
    k2 = compile_mod(m2, "mask", prefix="mm_")
    assert compiler.trace_count() == n and k1.key == k2.key
    assert len(k2.captured) == 2 and any(t is PREFIX for t in k2.captured)


def test_module_parameters_are_captures():
    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.zeros(H, 5))

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score + self.table[h, (q_idx - kv_idx).clamp(-2, 2) + 2]

    mod = Bias()
    mc = compile_mod(mod.score_mod, "score", prefix="sm_")
    assert mc.captured[0] is mod.table and mc.specs[0].needs_grad
    mod.table = torch.nn.Parameter(torch.ones(H, 5))  # re-assigned: looked up again
    n = compiler.trace_count()
    mc2 = compile_mod(mod.score_mod, "score", prefix="sm_")
    assert mc2.captured[0] is mod.table and compiler.trace_count() == n


def test_lean_code():
    mc = compile_mod(causal, "mask", prefix="mm_")
    body = mc.fwd_body(out="o", b="b", h="h", q="q", kv="kv", indent="")
    assert "int64" not in body and body.count("\n") <= 2
    mc = compile_mod(rel_bias, "score", prefix="sm_")
    body = mc.fwd_body(out="o", score="s", b="b", h="h", q="q", kv="kv", indent="")
    assert body.count("tl.load") == 1 and "int64" not in body
    mc = compile_mod(document, "mask", prefix="mm_")
    body = mc.fwd_body(out="o", b="b", h="h", q="q", kv="kv", indent="")
    assert body.count("tl.load") == 2
    # int64 where the values need it
    mc = compile_mod(MASKS["int64_wide"], "mask", prefix="mm_")
    assert "tl.int64" in mc.fwd_body(out="o", b="b", h="h", q="q", kv="kv", indent="")
    src = compiler.explain(rel_bias, "score")
    assert "tl.atomic_add" not in src and "# backward" in src


@pytest.mark.parametrize(
    "fn, needle",
    [
        (lambda b, h, q, kv: q > kv if q > 3 else q < kv, "Python `if`"),
        (lambda b, h, q, kv: q.item() > kv, "`.item()`"),
        (lambda b, h, q, kv: int(q) > kv, "int()"),
        (lambda b, h, q, kv: sum(kv for _ in range(q)) > 0, "Python integer"),
        (lambda b, h, q, kv: torch.atan2(q.float(), kv.float()) > 0, "atan2"),
        (lambda b, h, q, kv: DOC[q:].sum() > 0, "slice"),
        (lambda b, h, q, kv: (INTERVALS[q] + 1)[0] > kv, "slice of a captured tensor"),
        (lambda b, h, q, kv: PREFIX > q, "without indexing"),
        (lambda b, h, q, kv: torch.arange(4, device=q.device)[q] > kv, "create it outside"),
    ],
)
def test_unsupported_constructs(fn, needle):
    with pytest.raises(UnsupportedModError) as ei:
        compile_mod(fn, "mask", prefix="mm_")
    msg = str(ei.value)
    assert needle in msg, msg
    assert 'kernel_options={"backend": "torch"}' in msg and "test_compiler.py" in msg
    assert isinstance(ei.value, TypeError)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        compile_mod(causal, "other", prefix="mm_")
    with pytest.raises(ValueError, match="prefix"):
        compile_mod(causal, "mask", prefix="1x")
    with pytest.raises(TypeError, match="bool"):
        compile_mod(lambda b, h, q, kv: q - kv, "mask", prefix="mm_")
    with pytest.raises(TypeError, match="floating"):
        compile_mod(lambda s, b, h, q, kv: q - kv, "score", prefix="sm_")
    with pytest.raises(ValueError, match="score"):
        compile_mod(causal, "mask", prefix="mm_").bwd_body(
            grad_score="g", grad_out="go", score="s", b="b", h="h", q="q", kv="kv", valid="v"
        )
