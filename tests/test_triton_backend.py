"""Triton backend against the float64 dense reference (error-ratio tolerance).

``interpreter`` tests run the kernels in Triton's interpreter on CPU tensors (small shapes);
``cuda`` tests run larger bf16/fp16 shapes on a GPU. Mods are compiled by
``hf_flexattn.compiler`` when it is importable; otherwise the hand-written ModCode stand-ins
below (same interface) are used for the test mods of this file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from hf_flexattn.kernels import _render  # noqa: E402
from reference import assert_close_by_ratio, reference_attention  # noqa: E402

from hf_flexattn.api import flex_attention  # noqa: E402
from hf_flexattn.backends import triton_backend as tb  # noqa: E402
from hf_flexattn.block_mask import create_block_mask, noop_mask  # noqa: E402

try:
    from hf_flexattn.compiler import compile_mod as _real_compile  # noqa: F401

    HAVE_COMPILER = True
except ImportError:
    HAVE_COMPILER = False
# HF_FLEXATTN_TEST_STANDINS=1 forces the stand-ins (isolates the kernels from the compiler)
USE_STANDINS = not HAVE_COMPILER or os.environ.get("HF_FLEXATTN_TEST_STANDINS") == "1"

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
TRITON = {"backend": "triton"}


# ------------------------------------------------------------------ test mods + stand-ins
class _Code(_render.NoScoreMod):
    """Minimal hand-written ModCode (used only while hf_flexattn.compiler is absent)."""

    def __init__(self, kind, key, fwd, bwd=None, captured=(), needs_grad=(), prefix="sm_"):
        self.kind, self.key = kind, key
        self._fwd, self._bwd = fwd, bwd
        self.captured = list(captured)
        self.params = [f"{prefix}c{i}_{n}" for i in range(len(captured)) for n in ("p", "s", "n")]
        self.grad_params = [f"{prefix}g{i}" for i, g in enumerate(needs_grad) if g]

        class Spec:
            def __init__(self, g):
                self.needs_grad = g

        self.specs = [Spec(g) for g in needs_grad] or [Spec(False) for _ in captured]

    def runtime_args(self):
        return [x for t in self.captured for x in (t, t.stride(0), t.shape[0])]

    def fwd_body(self, *, out, score, b, h, q, kv, indent, transposed=False):
        return "".join(f"{indent}{line}\n" for line in self._fwd(out, score, b, h, q, kv))

    def bwd_body(
        self, *, grad_score, grad_out, score, b, h, q, kv, valid, indent, transposed=False
    ):
        lines = self._bwd(grad_score, grad_out, score, b, h, q, kv, valid)
        return "".join(f"{indent}{line}\n" for line in lines)


def causal(offset: int = 0):
    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    causal_mask.standin = lambda: _Code(
        "mask", ("causal", offset), lambda o, s, b, h, q, kv: [f"{o} = {q} + {offset} >= {kv}"]
    )
    return causal_mask


def holes(b, h, q_idx, kv_idx):
    # q-block 1 (rows 16..31) sees nothing; rows q % 7 == 3 see nothing
    return (q_idx >= kv_idx) & (q_idx // 16 != 1) & (q_idx % 7 != 3)


holes.standin = lambda: _Code(
    "mask",
    ("holes",),
    lambda o, s, b, h, q, kv: [f"{o} = ({q} >= {kv}) & ({q} // 16 != 1) & ({q} % 7 != 3)"],
)


def key_padding(lengths: torch.Tensor):
    def pad(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    pad.standin = lambda: _Code(
        "mask",
        ("pad",),
        lambda o, s, b, h, q, kv: [
            f"{o} = {kv} < tl.load(mm_c0_p + {b} * mm_c0_s, mask={b} < mm_c0_n, other=0)"
        ],
        captured=[lengths],
        prefix="mm_",
    )
    return pad


def head_slope(slope: torch.Tensor):
    """Learnable ALiBi-like bias: ``score + slope[h] * (kv_idx - q_idx)``."""

    def slope_mod(score, b, h, q_idx, kv_idx):
        return score + slope[h] * (kv_idx - q_idx)

    def fwd(o, s, b, h, q, kv):
        return [
            f"{o} = {s} + tl.load(sm_c0_p + {h} * sm_c0_s, mask={h} < sm_c0_n, other=0.0)"
            f" * ({kv} - {q}).to(tl.float32)"
        ]

    def bwd(gs, go, s, b, h, q, kv, valid):
        return [
            f"{gs} = {go}",
            f"_t = tl.where({valid}, {go} * ({kv} - {q}).to(tl.float32), 0.0)",
            f"tl.atomic_add(sm_g0 + {h}, tl.sum(tl.sum(_t, 1), 0))",
        ]

    slope_mod.standin = lambda: _Code(
        "score",
        ("slope", slope.dtype, slope.requires_grad),
        fwd,
        bwd,
        captured=[slope],
        needs_grad=[slope.requires_grad],
    )
    return slope_mod


def _standin_hook(fn, kind, prefix):
    make = getattr(fn, "standin", None)
    if make is None:
        pytest.skip(f"no ModCode stand-in for {fn!r} and hf_flexattn.compiler is absent")
    return make()


@pytest.fixture(autouse=True)
def _compiler(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_FLEXATTN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kc"))
    if USE_STANDINS:
        monkeypatch.setattr(tb, "compile_mod_hook", _standin_hook)


# ------------------------------------------------------------------ checking helper
def _run_case(
    B,
    Hq,
    Hkv,
    L,
    S,
    E,
    Ev,
    *,
    dtype=torch.float32,
    score_mod=None,
    mask_mod=None,
    params=(),
    block=(16, 16),
    mask_bh=(None, None),
    scale=None,
    grads=True,
    kernel_options=None,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g).to(DEV, dtype).requires_grad_(grads)
    k = torch.randn(B, Hkv, S, E, generator=g).to(DEV, dtype).requires_grad_(grads)
    v = torch.randn(B, Hkv, S, Ev, generator=g).to(DEV, dtype).requires_grad_(grads)
    bm = create_block_mask(
        mask_mod or noop_mask, mask_bh[0], mask_bh[1], L, S, device=DEV, BLOCK_SIZE=block
    )
    opts = dict(TRITON, **(kernel_options or {}))
    out, lse = flex_attention(
        q,
        k,
        v,
        score_mod,
        bm,
        scale=scale,
        enable_gqa=Hq != Hkv,
        return_lse=True,
        kernel_options=opts,
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (B, Hq, L, Ev) and lse.shape == (B, Hq, L)

    def ref(cdt):
        return reference_attention(
            q, k, v, score_mod, mask_mod, scale, Hq != Hkv, compute_dtype=cdt
        )

    r_out, r_lse = ref(torch.float64)
    b_out, b_lse = ref(dtype)
    assert_close_by_ratio(out, r_out, b_out, "out")
    assert_close_by_ratio(lse, r_lse, b_lse, "lse")
    if not grads:
        return out, lse
    dout = torch.randn(out.shape, generator=g).to(DEV, dtype)
    inputs = [q, k, v, *params]
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(r_out, inputs, dout.double())
    base = torch.autograd.grad(b_out, inputs, dout)
    for name, a, r, bb in zip(
        ["dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(params))], got, want, base
    ):
        assert not torch.isnan(a).any(), name
        assert_close_by_ratio(a.to(bb.dtype), r, bb, name)
    return out, lse


pytestmark = pytest.mark.interpreter


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_causal_ragged_gqa(dtype):
    _run_case(2, 4, 2, 37, 37, 16, 16, dtype=dtype, mask_mod=causal())


def test_no_mask_cross_ev_ne_e():
    # L != S, Ev > E, full tiles only (score_mod None, noop mask)
    _run_case(1, 2, 2, 24, 56, 16, 48)


@pytest.mark.parametrize("scale", [0.3, -0.7])
def test_full_tiles_of_plain_scores_any_scale_sign(scale):
    # full tiles without a score_mod take the max before scaling when the scale is positive
    # (and the generic form otherwise); S a whole number of tiles, so both run on full tiles
    _run_case(1, 2, 1, 32, 64, 16, 16, scale=scale, mask_mod=causal(32), grads=False)
    _run_case(1, 2, 1, 32, 64, 16, 16, scale=scale, grads=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_loads_match_pointer_loads(dtype):
    # kernel_options["tma"]: K and V through tensor descriptors. Rows past S (ragged last
    # tile) and dims past E (E=24 padded to 32) read as zeros, as the masked loads do; k/v in
    # Transformers' [B, S, H, D] memory order; a partial and a full loop; GQA
    from hf_flexattn.kernels import flex_fwd

    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, L, S, E = 2, 4, 2, 40, 72, 24
    q = torch.randn(B, Hq, L, E, generator=g).to(DEV, dtype)
    k = torch.randn(B, S, Hkv, E, generator=g).to(DEV, dtype).transpose(1, 2)
    v = torch.randn(B, S, Hkv, E, generator=g).to(DEV, dtype).transpose(1, 2)
    # fp32 qualifies only in the interpreter; on a GPU it falls back to the pointer loads
    eligible = dtype != torch.float32 or flex_fwd.interpreter_on()
    assert (flex_fwd.tma_descriptors(k, v, 16, 32, 32) is not None) == eligible
    mask = causal(S - L)
    bm = create_block_mask(mask, None, None, L, S, device=DEV, BLOCK_SIZE=(16, 32))
    outs = {}
    for tma in (False, True):
        outs[tma] = flex_attention(q, k, v, None, bm, enable_gqa=True, return_lse=True,
                                   kernel_options=dict(TRITON, tma=tma))
    r_out, r_lse = reference_attention(q, k, v, None, mask, None, True)
    b_out, b_lse = reference_attention(q, k, v, None, mask, None, True, compute_dtype=dtype)
    for tma, (out, lse) in outs.items():
        assert_close_by_ratio(out, r_out, b_out, f"out tma={tma}")
        assert_close_by_ratio(lse, r_lse, b_lse, f"lse tma={tma}")
    # the same tiles in the same order: the two agree exactly
    torch.testing.assert_close(outs[True][0], outs[False][0], atol=0, rtol=0)


def _record_launches(monkeypatch):
    """A list that fills with ``(python function, args, kwargs)`` for each kernel launch the
    interpreter runs from here on (the test's monkeypatch undoes the hook)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run

    def record(self, *args, **kwargs):
        launches.append((self.fn, args, dict(kwargs)))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    return launches


@pytest.mark.skipif(HAS_CUDA, reason="records the interpreter's launches")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_launch_states_fp_fusion(dtype, monkeypatch):
    # Triton 3.10 turns its fused multiply-add default off: the kernels never rely on it.
    # fp32 forward/backward kernels run without fusion (the backward recomputes the
    # forward's rounded exponents); low precision and the decode kernel keep it
    launches = _record_launches(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 32, 16, generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, 2, 300, 16, generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, 2, 300, 16, generator=g).to(dtype).requires_grad_()
    bm = create_block_mask(noop_mask, None, None, 32, 300, device=DEV, BLOCK_SIZE=(16, 32))
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=TRITON)
    out.float().sum().backward()
    with torch.no_grad():  # one query row against a long cache: the decode kernel
        bm1 = create_block_mask(noop_mask, None, None, 1, 300, device=DEV)
        flex_attention(q[:, :, :1].detach(), k.detach(), v.detach(), block_mask=bm1,
                       kernel_options=TRITON)
    kinds = {fn.__name__: kw.get("enable_fp_fusion", "unset") for fn, _, kw in launches}
    fused = dtype != torch.float32
    assert kinds.pop("flex_decode_split_kernel") is True
    assert kinds.pop("flex_fwd_kernel") is fused
    assert kinds.pop("flex_bwd_pre_kernel") is fused
    assert kinds and all(flag is fused for flag in kinds.values()), kinds  # dK/dV, dQ


_SM90_COMPILE = """
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
out = {}
for job in json.load(sys.stdin):
    spec = importlib.util.spec_from_file_location("_sm90_" + job["name"], job["path"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    attrs = {(i,): [["tt.divisibility", 16]] for i in job["divisible"]}
    src = triton.compiler.ASTSource(fn=getattr(mod, job["name"]), signature=job["sig"],
                                    constexprs=job["cx"], attrs=attrs)
    ttgir = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                           options=job["opts"]).asm["ttgir"]
    out[job["name"]] = [line.split(" loc(")[0].strip() for line in ttgir.splitlines()
                        if "ttg.async_wait %" in line]
print(json.dumps(out))
"""


def _sm90_async_waits(launches):
    """Compile recorded ``(function, args, kwargs)`` launches of rendered kernels for sm_90
    (Triton's own toolchain, no GPU needed) and return each kernel's ``ttg.async_wait``
    lines. Pointers are typed by tensor dtype, ints as Triton specialises them (1 a
    constant, multiples of 16 divisible). Runs in a fresh process: the interpreter leaves
    ``triton.language`` patched after a kernel calls a jitted helper."""
    import inspect

    ptr = {torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
           torch.int64: "*i64", torch.bfloat16: "*bf16"}
    jobs = []
    for fn, args, kwargs in launches:
        sig, cx, divisible = {}, {}, []
        for i, par in enumerate(inspect.signature(fn).parameters.values()):
            pname, v = par.name, args[i] if i < len(args) else kwargs[par.name]
            if "constexpr" in str(par.annotation) or v is None or isinstance(v, bool):
                sig[pname] = "constexpr"
                # UPCAST is the interpreter's bf16 workaround: off in a GPU compile
                cx[pname] = False if pname == "UPCAST" else v
            elif isinstance(v, torch.Tensor):
                sig[pname] = ptr[v.dtype]
                divisible.append(i)
            elif isinstance(v, int) and v == 1:
                sig[pname], cx[pname] = "constexpr", 1
            elif isinstance(v, int):
                sig[pname] = "i32"
                if v % 16 == 0:
                    divisible.append(i)
            else:
                sig[pname] = "fp32"
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages")}
        jobs.append(dict(name=fn.__name__, path=inspect.getsourcefile(fn), sig=sig, cx=cx,
                         divisible=divisible, opts=opts))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SM90_COMPILE], input=json.dumps(jobs),
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(HAS_CUDA, reason="records the interpreter's launches")
def test_tile_loops_keep_copies_in_flight_on_sm90(monkeypatch):
    # Loaded in the step that uses it, a tile index became an async copy committed after
    # the K/V copies, and every step's wait drained all copies ({num = 0}): K/V loads no
    # longer overlapped the math (2-9 % of the prompt's forward on an H200). The kernels
    # prefetch the index into registers; each loop must wait with copies still in flight
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    launches = _record_launches(monkeypatch)
    g = torch.Generator().manual_seed(0)
    L, S = 128, 256
    q = torch.randn(1, 2, L, 64, generator=g).half().requires_grad_()
    k = torch.randn(1, 1, S, 64, generator=g).half().requires_grad_()
    v = torch.randn(1, 1, S, 64, generator=g).half().requires_grad_()

    def band(b, h, i, j):  # partial and full tiles on every row
        return (j <= i + S - L) & (j > i - 150)

    bm = create_block_mask(band, None, None, L, S, device=DEV, BLOCK_SIZE=(32, 32))
    opts = dict(TRITON, BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=3, bwd_BLOCK_M=32,
                bwd_BLOCK_N=32, bwd_num_stages=3, bwd_dq_BLOCK_M=32, bwd_dq_BLOCK_N=32,
                bwd_dq_num_stages=3)
    flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts
                   ).float().sum().backward()
    with torch.no_grad():
        bm1 = create_block_mask(lambda b, h, i, j: j > 40, None, None, 1, S, device=DEV,
                                BLOCK_SIZE=(16, 32))
        flex_attention(q[:, :, :1].detach(), k.detach(), v.detach(), block_mask=bm1,
                       enable_gqa=True, kernel_options=TRITON)
    seen = {}  # each kernel's first launch
    for fn, args, kwargs in launches:
        if fn.__name__ == "flex_decode_split_kernel":  # compiled at its GPU default stages
            kwargs = dict(kwargs, num_stages=3)
        if fn.__name__ != "flex_bwd_pre_kernel":
            seen.setdefault(fn.__name__, (fn, args, kwargs))
    loops = {"flex_fwd_kernel": 2, "flex_decode_split_kernel": 2}
    bwd = [n for n in seen if n not in loops]
    assert set(loops) <= set(seen) and bwd, sorted(seen)
    for name, waits in _sm90_async_waits(seen.values()).items():
        drained = [w for w in waits if "{num = 0 " in w]
        assert not drained, (name, drained)
        # partial and full loops (the fused backward: dK/dV and dQ, each both) pipelined
        assert len(waits) == loops.get(name, 4), (name, waits)


def test_forward_defaults_per_device():
    # the measured Hopper default for 16-bit inputs: K/V through tensor descriptors (128 x
    # 128 tiles at head dim 128); fp32, other GPUs and the interpreter keep pointer loads
    from hf_flexattn.kernels import flex_fwd

    tiles = lambda c: (c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages, c.tma)  # noqa: E731
    bf16 = torch.bfloat16
    assert tiles(flex_fwd.choose_config((9, 0), bf16, 128, 8192, 128, 128, {})) == (
        128, 128, 8, 3, True)
    assert flex_fwd.choose_config((9, 0), torch.float16, 64, 8192, 128, 128, {}).tma
    assert not flex_fwd.choose_config((9, 0), torch.float32, 128, 8192, 128, 128, {}).tma
    assert not flex_fwd.choose_config((8, 0), bf16, 128, 8192, 128, 128, {}).tma
    assert not flex_fwd.choose_config(None, torch.float16, 64, 8192, 128, 128, {}).tma
    assert not flex_fwd.choose_config((9, 0), bf16, 128, 8192, 128, 128, {"tma": False}).tma
    cfg = flex_fwd.choose_config((9, 0), bf16, 128, 8192, 128, 128,
                                 {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4})
    assert tiles(cfg) == (64, 64, 4, 3, True)


def test_tma_option_checks_and_fallback():
    from hf_flexattn.kernels import flex_fwd

    q, k, v = (torch.randn(1, 2, 32, 16, device=DEV) for _ in range(3))
    bm = create_block_mask(noop_mask, None, None, 32, 32, device=DEV, BLOCK_SIZE=(16, 16))
    with pytest.raises(ValueError, match='kernel_options\\["tma"\\] must be a bool'):
        flex_attention(q, k, v, block_mask=bm, kernel_options=dict(TRITON, tma="yes"))
    # tensors that do not qualify (last dim not contiguous, a head dim of 6 bytes) run the
    # pointer loads, with the same results
    kt = torch.randn(1, 2, 16, 32, device=DEV).transpose(2, 3)
    assert flex_fwd.tma_descriptors(kt, kt, 16, 16, 16) is None
    small = torch.randn(1, 2, 32, 3, device=DEV, dtype=torch.float16)
    assert flex_fwd.tma_descriptors(small, small, 16, 16, 16) is None
    want = flex_attention(q, kt, kt, block_mask=bm, kernel_options=TRITON)
    got = flex_attention(q, kt, kt, block_mask=bm, kernel_options=dict(TRITON, tma=True))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_learnable_capture_grad_and_partial_tiles():
    slope = torch.tensor([0.05, -0.02, 0.1, 0.03], device=DEV, requires_grad=True)
    _run_case(
        1,
        4,
        2,
        50,
        50,
        16,
        16,
        score_mod=head_slope(slope),
        mask_mod=causal(),
        params=[slope],
        block=(32, 16),
    )


def test_fully_masked_rows_zero_out_neg_inf_lse():
    out, lse = _run_case(1, 2, 2, 64, 64, 16, 16, mask_mod=holes)
    rows = torch.tensor([r for r in range(64) if r // 16 == 1 or r % 7 == 3], device=DEV)
    assert (out[:, :, rows] == 0).all()
    assert torch.isneginf(lse[:, :, rows]).all()


def test_mask_per_batch_with_capture_and_empty_batch():
    lengths = torch.tensor([0, 30], device=DEV)
    _run_case(2, 2, 2, 20, 37, 16, 16, mask_mod=key_padding(lengths), mask_bh=(2, None))


def test_head_dim_80_non_pow2():
    _run_case(1, 2, 2, 40, 40, 80, 80, mask_mod=causal(), block=(32, 32))


@pytest.mark.parametrize("L", [1, 5, 16])
def test_decode_shapes(L):
    S = 300
    _run_case(1, 6, 2, L, S, 32, 32, mask_mod=causal(S - L), block=(128, 128))


def test_mask_broadcast_heads_and_kernel_options_small_tiles():
    # mask H=Hq explicit, tiles smaller than the sparse blocks (sub-tiling)
    _run_case(
        1,
        2,
        2,
        70,
        70,
        16,
        16,
        mask_mod=causal(),
        mask_bh=(None, 2),
        block=(64, 64),
        kernel_options={"BLOCK_M": 16, "BLOCK_N": 32, "bwd_BLOCK_M": 16, "bwd_BLOCK_N": 16},
    )


def test_strided_inputs_outputs_and_grads_keep_the_layout():
    # q/k/v as transposed views of [B, L, H, D] (Transformers' layout, GQA): the output is
    # stored like q (so out.transpose(1, 2) is contiguous) and each gradient like its input
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, L, E, Ev = 2, 4, 2, 33, 16, 32
    q = torch.randn(B, L, Hq, E, generator=g).to(DEV).transpose(1, 2).requires_grad_()
    k = torch.randn(B, L, Hkv, E, generator=g).to(DEV).transpose(1, 2).requires_grad_()
    v = torch.randn(B, L, Hkv, Ev, generator=g).to(DEV).transpose(1, 2).requires_grad_()
    bm = create_block_mask(causal(), None, None, L, L, device=DEV, BLOCK_SIZE=(16, 16))
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=TRITON)
    assert out.shape == (B, Hq, L, Ev) and out.transpose(1, 2).is_contiguous()
    r, _ = reference_attention(q, k, v, mask_mod=causal(), enable_gqa=True)
    b, _ = reference_attention(
        q, k, v, mask_mod=causal(), enable_gqa=True, compute_dtype=torch.float32
    )
    assert_close_by_ratio(out, r, b, "out")
    dout = torch.randn(B, L, Hq, Ev, generator=g).to(DEV).transpose(1, 2)
    got = torch.autograd.grad(out, [q, k, v], dout)
    want = torch.autograd.grad(r, [q, k, v], dout.double())
    base = torch.autograd.grad(b, [q, k, v], dout)
    for name, x, a, w, bb in zip("qkv", (q, k, v), got, want, base):
        assert a.stride() == x.stride(), name
        assert_close_by_ratio(a, w, bb, "d" + name)
    # plain [B, H, L, D] inputs keep giving plain contiguous outputs
    q2, k2, v2 = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    q2, k2, v2 = q2.contiguous(), k2.contiguous(), v2.contiguous()
    out2 = flex_attention(q2, k2, v2, block_mask=bm, enable_gqa=True, kernel_options=TRITON)
    assert out2.is_contiguous()
    torch.testing.assert_close(out2, out.detach())


def test_same_structure_compiles_once():
    def run(slope_vals, offset):
        slope = torch.tensor(slope_vals, device=DEV)
        q = torch.randn(1, 2, 20, 16, device=DEV)
        bm = create_block_mask(causal(offset), None, None, 20, 20, device=DEV, BLOCK_SIZE=(16, 16))
        return flex_attention(q, q, q, head_slope(slope), bm, kernel_options=TRITON)

    run([0.1, 0.2], 0)
    n = _render.render_count("flex_fwd")
    run([0.3, -0.1], 0)  # new closures, same code and structure
    assert _render.render_count("flex_fwd") == n


def test_block_size_not_multiple_of_16_is_rejected():
    q = torch.randn(1, 1, 24, 16, device=DEV)
    bm = create_block_mask(causal(), None, None, 24, 24, device=DEV, BLOCK_SIZE=(8, 8))
    with pytest.raises(ValueError, match="multiple of 16"):
        flex_attention(q, q, q, block_mask=bm, kernel_options=TRITON)


# ------------------------------------------------------------------ EVEN fast paths, configs
_ASYM = {"bwd_BLOCK_M": 16, "bwd_BLOCK_N": 32, "bwd_dq_BLOCK_M": 32, "bwd_dq_BLOCK_N": 16}


@pytest.mark.parametrize(
    "L, S, E, Ev, block",
    [
        (64, 64, 32, 32, (32, 32)),  # EVEN_M, EVEN_N, EVEN_D everywhere
        (64, 80, 32, 16, (32, 32)),  # even rows, ragged kv (S % KV_BLOCK != 0)
        (80, 64, 24, 32, (32, 32)),  # ragged rows (L % Q_BLOCK != 0), padded head dim
    ],
    ids=["even", "ragged_kv", "ragged_q_pad_d"],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_launches"])
def test_even_and_ragged_shapes_asymmetric_bwd_tiles(L, S, E, Ev, block, fused):
    # learnable capture (atomics in the transposed dK/dV kernel, on full and partial tiles),
    # GQA, dK/dV tiles 16 x 32 and dQ tiles 32 x 16 (separate configs), sub-tiling; the
    # backward as one launch or as two
    slope = torch.tensor([0.05, -0.02, 0.1, 0.03], device=DEV, requires_grad=True)
    _run_case(
        1,
        4,
        2,
        L,
        S,
        E,
        Ev,
        score_mod=head_slope(slope),
        mask_mod=causal(S - L if S > L else 0),
        params=[slope],
        block=block,
        kernel_options=dict(_ASYM, BLOCK_M=32, BLOCK_N=16, bwd_fused=fused),
    )


def qkv_bias(qb: torch.Tensor, kb: torch.Tensor):
    """Learnable per-query and per-key biases (captures indexed by q only / kv only)."""

    def bias(score, b, h, q_idx, kv_idx):
        return score * (1.0 + qb[q_idx]) + kb[kv_idx]

    return bias


@pytest.mark.parametrize("L", [64, 50], ids=["even", "ragged"])
def test_q_and_kv_indexed_capture_grads(L):
    if USE_STANDINS:
        pytest.skip("needs hf_flexattn.compiler")
    g = torch.Generator().manual_seed(3)
    qb = (torch.randn(L, generator=g) * 0.1).to(DEV).requires_grad_(True)
    kb = (torch.randn(L, generator=g) * 0.5).to(DEV).requires_grad_(True)
    _run_case(
        2,
        2,
        1,
        L,
        L,
        16,
        16,
        score_mod=qkv_bias(qb, kb),
        mask_mod=causal(),
        params=[qb, kb],
        block=(32, 32),
        kernel_options=_ASYM,
    )


def test_bwd_config_defaults_and_overrides():
    from hf_flexattn.kernels import flex_bwd

    bf16 = torch.bfloat16
    cfg = flex_bwd.choose_bwd_config((9, 0), bf16, 128, 8192, 128, 128, {})
    assert (cfg.dkdv.BLOCK_M, cfg.dkdv.BLOCK_N) == (64, 128)
    assert (cfg.dq.BLOCK_M, cfg.dq.BLOCK_N) == (128, 64)
    # fitted to the BlockMask's block sizes; short queries get small q tiles
    cfg = flex_bwd.choose_bwd_config((9, 0), bf16, 128, 8192, 64, 32, {})
    assert (cfg.dkdv.BLOCK_M, cfg.dkdv.BLOCK_N, cfg.dq.BLOCK_M, cfg.dq.BLOCK_N) == (64, 32, 64, 32)
    cfg = flex_bwd.choose_bwd_config((9, 0), bf16, 64, 5, 128, 128, {})
    assert cfg.dkdv.BLOCK_M == 16 and cfg.dq.BLOCK_M == 16
    opts = {
        "bwd_BLOCK_M": 32,
        "bwd_BLOCK_N": 64,
        "bwd_num_warps": 4,
        "bwd_num_stages": 2,
        "bwd_dq_BLOCK_M": 64,
        "bwd_dq_BLOCK_N": 32,
        "bwd_dq_num_warps": 8,
        "bwd_dq_num_stages": 1,
    }
    cfg = flex_bwd.choose_bwd_config((9, 0), bf16, 128, 8192, 128, 128, opts)
    tiles = lambda c: (c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages)  # noqa: E731
    assert tiles(cfg.dkdv) == (32, 64, 4, 2) and not cfg.dkdv.tma
    assert tiles(cfg.dq) == (64, 32, 8, 1) and not cfg.dq.tma
    with pytest.raises(ValueError, match="bwd_dq_BLOCK_N"):
        flex_bwd.choose_bwd_config((9, 0), bf16, 128, 128, 128, 128, {"bwd_dq_BLOCK_N": 48})
    with pytest.raises(ValueError, match="bwd_dq_num_warps"):
        flex_bwd.choose_bwd_config((9, 0), bf16, 128, 128, 128, 128, {"bwd_dq_num_warps": 0})


def test_bwd_fused_option():
    from hf_flexattn.kernels import flex_bwd

    choose = functools.partial(flex_bwd.choose_bwd_config, (9, 0), torch.bfloat16, 128, 8192,
                               128, 128)
    assert choose({}).fused  # the defaults' warps and stages agree: one launch
    assert not choose({"bwd_fused": False}).fused
    assert not choose({"bwd_num_warps": 4}).fused  # they differ: two launches
    with pytest.raises(ValueError, match=r"bwd_fused.*bwd_dq_num_warps"):
        choose({"bwd_fused": True, "bwd_num_warps": 4})
    with pytest.raises(ValueError, match="must be a bool"):
        choose({"bwd_fused": 1})


def test_dkdv_kernel_transposes_no_register_tiles():
    # the dK/dV kernel works on [BLOCK_N, BLOCK_M] tiles: only loaded operands (dO, qT) are
    # transposed, never P or dS
    from hf_flexattn.kernels import flex_bwd

    src = flex_bwd.render_bwd(_render.NoScoreMod(), _render.NoMaskMod(), torch.bfloat16)
    dkdv = src[src.index("def _dkdv_tile") : src.index("def _dq_tile")]
    dq = src[src.index("def _dq_tile") : src.index("def flex_bwd_dkdv_kernel")]
    assert set(re.findall(r"tl\.trans\((\w+)\)", dkdv)) == {"do", "qT"}
    assert set(re.findall(r"tl\.trans\((\w+)\)", dq)) == {"kT"}


# ------------------------------------------------------------------ zoo (real compiler only)
def _zoo_cases():
    try:
        from zoo import ZOO
    except ImportError:  # pragma: no cover
        return []
    return ZOO


@pytest.mark.parametrize("case", _zoo_cases(), ids=lambda c: c.name)
def test_zoo(case):
    if USE_STANDINS:
        pytest.skip("needs hf_flexattn.compiler")
    from zoo import make_block_mask

    score_mod, mask_mod, params = case.build(torch.device(DEV))
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32
    q = torch.randn(case.B, case.Hq, case.L, case.E, generator=g).to(DEV, dtype)
    k = torch.randn(case.B, case.Hkv, case.S, case.E, generator=g).to(DEV, dtype)
    v = torch.randn(case.B, case.Hkv, case.S, case.Ev, generator=g).to(DEV, dtype)
    for t in (q, k, v):
        t.requires_grad_(True)
    bm = make_block_mask(case, mask_mod, DEV)
    out, lse = flex_attention(
        q,
        k,
        v,
        score_mod,
        bm,
        scale=case.scale,
        enable_gqa=case.gqa,
        return_lse=True,
        kernel_options=TRITON,
    )
    r_out, r_lse = reference_attention(q, k, v, score_mod, mask_mod, case.scale, case.gqa)
    b_out, b_lse = reference_attention(
        q, k, v, score_mod, mask_mod, case.scale, case.gqa, compute_dtype=dtype
    )
    assert_close_by_ratio(out, r_out, b_out, "out")
    assert_close_by_ratio(lse, r_lse, b_lse, "lse")
    dout = torch.randn(out.shape, generator=g).to(DEV, dtype)
    inputs = [q, k, v, *params]
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(r_out, inputs, dout.double())
    base = torch.autograd.grad(b_out, inputs, dout)
    for i, (a, r, bb) in enumerate(zip(got, want, base)):
        assert_close_by_ratio(a, r, bb, f"grad{i}")


# ------------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph_matches_eager():
    slope = torch.tensor([0.05, -0.02], device=DEV, requires_grad=True)
    sm = head_slope(slope)
    bm = create_block_mask(causal(), None, None, 24, 24, device=DEV, BLOCK_SIZE=(16, 16))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g).to(DEV).requires_grad_() for _ in "qkv")

    def f(q, k, v):
        return flex_attention(q, k, v, sm, bm, kernel_options=TRITON)

    eager = f(q, k, v)
    ge = torch.autograd.grad(eager.sum(), [q, k, v, slope])
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    gc = torch.autograd.grad(compiled.sum(), [q, k, v, slope])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "B, Hq, L", [(65536, 1, 16), (1, 65536, 16), (65536, 1, 1)], ids=["batch", "heads", "decode"]
)
def test_grid_limits_are_refused_before_launch(B, Hq, L):
    # batch and heads sit on the grid's z and y axes (CUDA: at most 65535 each)
    q = torch.randn(B, Hq, L, 16, device=DEV)
    k = v = torch.randn(B, Hq, 32, 16, device=DEV)
    with pytest.raises(ValueError, match=r"at most 65535 batch entries.*backend': 'torch'"):
        flex_attention(q, k, v, kernel_options=TRITON)


# ------------------------------------------------------------------ CUDA (device machine)
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_large_causal_gqa(dtype, D):
    L = 1024 + 37
    slope = torch.tensor([0.01 * (i + 1) for i in range(8)], device=DEV, requires_grad=True)
    _run_case(
        2,
        8,
        2,
        L,
        L,
        D,
        D,
        dtype=dtype,
        mask_mod=causal(),
        score_mod=head_slope(slope),
        params=[slope],
        block=(128, 128),
    )


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_tma_forward_default_tiles(D):
    # the forward with tensor-descriptor K/V loads at the Hopper default (128 x 128 tiles):
    # a ragged causal prompt, GQA, k/v in Transformers' [B, S, H, D] memory order, a
    # score_mod; both against fp64
    from hf_flexattn.kernels import flex_fwd

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need compute capability 9")
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, L = 2, 8, 2, 1024 + 37
    dt = torch.bfloat16
    q = torch.randn(B, L, Hq, D, generator=g).to(DEV, dt).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D, generator=g).to(DEV, dt).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, generator=g).to(DEV, dt).transpose(1, 2)
    assert flex_fwd.tma_descriptors(k, v, 128, D, D) is not None
    slope = torch.tensor([0.01 * (i + 1) for i in range(Hq)], device=DEV)
    sm, mm = head_slope(slope), causal()
    bm = create_block_mask(mm, None, None, L, L, device=DEV, BLOCK_SIZE=(128, 128))
    outs = [
        flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=dict(TRITON, tma=t))
        for t in (False, True)
    ]
    r, _ = reference_attention(q, k, v, sm, mm, None, True)
    b, _ = reference_attention(q, k, v, sm, mm, None, True, compute_dtype=dt)
    assert_close_by_ratio(outs[0], r, b, "out pointer loads")
    assert_close_by_ratio(outs[1], r, b, "out tma")


@pytest.mark.cuda
def test_cuda_tma_forward_repeated_calls_launch_directly():
    # calls with tensor-descriptor K/V after the first skip Triton's binding: the compiled
    # launcher gets the descriptors. Fresh tensors, the same shape again, a longer sequence
    # (new descriptor shape, same specialisation) and a batch of 1 (another one) must all
    # be right
    from hf_flexattn.kernels import _launch, flex_fwd

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need compute capability 9")
    Hq, Hkv, D, dt = 8, 2, 128, torch.bfloat16
    sm, mm = head_slope(torch.linspace(0.01, 0.08, Hq, device=DEV)), causal()
    direct = _launch.stats["direct"]
    for i, (B, L) in enumerate([(2, 640), (2, 640), (2, 640), (2, 1024 + 37), (1, 640)]):
        g = torch.Generator().manual_seed(20 + i)
        q = torch.randn(B, L, Hq, D, generator=g).to(DEV, dt).transpose(1, 2)
        k = torch.randn(B, L, Hkv, D, generator=g).to(DEV, dt).transpose(1, 2)
        v = torch.randn(B, L, Hkv, D, generator=g).to(DEV, dt).transpose(1, 2)
        assert flex_fwd.tma_descriptors(k, v, 128, D, D) is not None
        bm = create_block_mask(mm, None, None, L, L, device=DEV, BLOCK_SIZE=(128, 128))
        out = flex_attention(q, k, v, sm, bm, enable_gqa=True,
                             kernel_options=dict(TRITON, tma=True))
        r, _ = reference_attention(q, k, v, sm, mm, None, True)
        b, _ = reference_attention(q, k, v, sm, mm, None, True, compute_dtype=dt)
        assert_close_by_ratio(out, r, b, f"out[{i}]")
    assert _launch._DESC[0] and not _launch._disabled
    assert _launch.stats["direct"] >= direct + 2  # calls 1 and 2 went direct


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_decode_and_head_dims(dtype):
    for L, E, Ev in ((1, 128, 128), (16, 64, 64), (300, 80, 80), (300, 96, 64), (200, 256, 256)):
        S = 2048 + 5
        _run_case(
            1,
            8,
            2,
            L,
            S,
            E,
            Ev,
            dtype=dtype,
            mask_mod=causal(S - L),
            block=(128, 128),
            grads=L > 16,
        )


@pytest.mark.cuda
def test_cuda_batch_times_heads_past_65535():
    # 4100 x 16 = 65600 (batch, head) programs: more than one grid axis holds
    _run_case(4100, 16, 8, 32, 32, 16, 16, mask_mod=causal(), block=(16, 16))


@pytest.mark.cuda
def test_cuda_fp32_exact_products():
    _run_case(1, 4, 4, 300, 300, 64, 64, dtype=torch.float32, mask_mod=causal(), block=(128, 128))


def test_torch_compile_dynamic_shapes_matches_eager():
    # symbolic sizes (dynamic=True, or dynamo's automatic dynamic after a recompile) must not
    # reach the constant-folded preparation
    torch._dynamo.reset()
    slope = torch.tensor([0.05, -0.02], device=DEV, requires_grad=True)
    sm = head_slope(slope)

    def f(q, k, v, bm):
        return flex_attention(q, k, v, sm, bm, kernel_options=TRITON)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, L in ((1, 24), (2, 40)):
        bm = create_block_mask(causal(), None, None, L, L, device=DEV, BLOCK_SIZE=(16, 16))
        g = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(B, 2, L, 16, generator=g).to(DEV).requires_grad_() for _ in "qkv")
        eager = f(q, k, v, bm)
        ge = torch.autograd.grad(eager.sum(), [q, k, v, slope])
        got = compiled(q, k, v, bm)
        gc = torch.autograd.grad(got.sum(), [q, k, v, slope])
        torch.testing.assert_close(got, eager)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)


def test_torch_compile_recompiles_when_a_mod_constant_changes():
    # the kernel bakes Python numbers in; under torch.compile they must be guarded, or a mask
    # with another offset (same shapes) would silently reuse the first kernel
    torch._dynamo.reset()

    def f(q, k, v, bm):
        return flex_attention(q, k, v, None, bm, kernel_options=TRITON)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g).to(DEV) for _ in "qkv")
    outs = []
    for off in (0, 9):
        bm = create_block_mask(causal(off), None, None, 32, 32, device=DEV, BLOCK_SIZE=(16, 16))
        outs.append(compiled(q, k, v, bm))
        torch.testing.assert_close(outs[-1], f(q, k, v, bm))
    assert not torch.allclose(outs[0], outs[1])
