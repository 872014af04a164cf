"""Split-KV decode kernel (``kernels/flex_decode.py``) and its dispatch in the Triton backend.

Checks the decode kernel against the float64 dense reference (error-ratio tolerance) and
against the regular forward kernel, on decode shapes (``L`` = 1..4 rows, GQA ratios 1..4,
ragged ``S``, splits that do not divide the kv work, empty splits and rows that see
nothing), the dispatch rule (used only without gradients, for small ``L * GROUP``, long
``S`` and head-broadcast masks unless GROUP == 1) and prepare's per-call fast path.
``interpreter`` tests run under ``TRITON_INTERPRET=1``; ``cuda`` tests use large bf16 shapes.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

pytest.importorskip("triton")

from hf_flexattn.kernels import flex_decode, flex_fwd  # noqa: E402
from reference import assert_close_by_ratio, reference_attention  # noqa: E402

from hf_flexattn import mods as M  # noqa: E402
from hf_flexattn._mod_eval import freeze_family  # noqa: E402
from hf_flexattn.api import flex_attention  # noqa: E402
from hf_flexattn.backends import triton_backend as tb  # noqa: E402
from hf_flexattn.block_mask import create_block_mask, noop_mask  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _cache_dir(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_FLEXATTN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kc"))


@pytest.fixture
def calls(monkeypatch):
    """Counts launches of the decode and of the regular forward kernel."""
    n = {"decode": 0, "fwd": 0}
    dec, fwd = flex_decode.launch_decode, flex_fwd.launch

    def count_dec(*a, **k):
        n["decode"] += 1
        return dec(*a, **k)

    def count_fwd(*a, **k):
        n["fwd"] += 1
        return fwd(*a, **k)

    plan_call = flex_decode.DecodePlan.__call__

    def count_plan(self, *a, **k):  # a stored plan (repeated decode call): the decode kernel
        n["decode"] += 1
        return plan_call(self, *a, **k)

    monkeypatch.setattr(flex_decode, "launch_decode", count_dec)
    monkeypatch.setattr(flex_decode.DecodePlan, "__call__", count_plan)
    monkeypatch.setattr(flex_fwd, "launch", count_fwd)
    return n


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, S, E, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g).to(device, dtype)
    return q, k, v


def _run(q, k, v, score_mod, bm, opts, scale=None):
    return flex_attention(
        q,
        k,
        v,
        score_mod,
        bm,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        return_lse=True,
        kernel_options=dict({"backend": "triton"}, **opts),
    )


def _check(
    calls,
    B,
    Hq,
    Hkv,
    L,
    S,
    *,
    E=16,
    Ev=16,
    score_mod=None,
    mask_mod=None,
    mask_bh=(None, None),
    block=(16, 64),
    dtype=torch.float32,
    splits=None,
    scale=None,
    compare_regular=True,
):
    q, k, v = _inputs(B, Hq, Hkv, L, S, E, Ev, dtype)
    bm = create_block_mask(
        mask_mod or noop_mask, mask_bh[0], mask_bh[1], L, S, device=DEV, BLOCK_SIZE=block
    )
    opts = {"decode": True} if splits is None else {"decode": True, "split_kv": splits}
    before = calls["decode"]
    out, lse = _run(q, k, v, score_mod, bm, opts, scale)
    assert calls["decode"] == before + 1, "the decode kernel did not run"
    assert out.shape == (B, Hq, L, Ev) and out.dtype == dtype and lse.dtype == torch.float32
    gqa = Hq != Hkv
    r_out, r_lse = reference_attention(q, k, v, score_mod, mask_mod, scale, gqa)
    b_out, b_lse = reference_attention(
        q, k, v, score_mod, mask_mod, scale, gqa, compute_dtype=dtype
    )
    assert_close_by_ratio(out, r_out, b_out, "out")
    assert_close_by_ratio(lse, r_lse, b_lse, "lse")
    if compare_regular:
        n_fwd = calls["fwd"]
        o2, l2 = _run(q, k, v, score_mod, bm, {"decode": False}, scale)
        assert calls["fwd"] == n_fwd + 1
        # both kernels were checked against fp64 above. In fp32 they must agree to
        # accumulation order; in fp16/bf16 each may be off by up to the low-precision
        # baseline's error, so they may differ by twice that (plus a one-ulp floor)
        if dtype == torch.float32:
            torch.testing.assert_close(out, o2, atol=2e-6, rtol=2e-6)
            torch.testing.assert_close(lse, l2, atol=2e-6, rtol=2e-6)
        else:
            for name, a, c, b, r in (
                ("out", out, o2, b_out, r_out),
                ("lse", lse, l2, b_lse, r_lse),
            ):
                fin = torch.isfinite(r)
                base = (b.double() - r)[fin].abs().max().item() if fin.any() else 0.0
                ulp = torch.finfo(dtype).eps * r[fin].abs().max().item() if fin.any() else 0.0
                diff = (a.double() - c.double())[fin].abs().max().item() if fin.any() else 0.0
                assert diff <= 2 * base + ulp, (
                    f"{name}: decode vs regular {diff:.3g} > {2 * base + ulp:.3g}"
                )
    return out, lse


# ------------------------------------------------------------------ kernel vs reference
@pytest.mark.parametrize(
    "Hq,Hkv,L",
    [(2, 2, 1), (4, 2, 1), (6, 2, 2), (8, 2, 4), (3, 1, 4), (16, 4, 4)],
    ids=lambda x: str(x),
)
def test_causal_offset_gqa(calls, Hq, Hkv, L):
    S = 300
    _check(calls, 1, Hq, Hkv, L, S, mask_mod=M.causal(S - L))


@pytest.mark.parametrize("splits", [1, 2, 3, 4, 7, 64])
def test_splits_uneven_and_empty(calls, splits):
    # 5 kv blocks of 64 = 5 work items: 3 and 4 splits leave ragged / empty splits,
    # 64 is clamped to the item count
    S = 300
    _check(calls, 1, 4, 2, 2, S, mask_mod=M.causal(S - 2), splits=splits, compare_regular=False)


def test_alibi_gqa_h_tile(calls):
    # slopes[h] is a gather over the per-row head tile (h = hkv * GROUP + r // L)
    S, L = 300, 2
    slopes = torch.as_tensor(M.alibi_slopes_bloom(8), dtype=torch.float32).to(DEV)
    _check(calls, 2, 8, 2, L, S, score_mod=M.alibi(slopes), mask_mod=M.causal(S - L))


def test_softcap_sliding_window(calls):
    S, L = 333, 1
    _check(
        calls,
        1,
        4,
        2,
        L,
        S,
        score_mod=M.softcap(20.0),
        mask_mod=M.sliding_window(100, offset=S - L),
        scale=1.0,
    )


def test_key_padding_per_batch_rows_see_nothing(calls):
    S, L = 280, 2
    lengths = torch.tensor([0, 150, 280], device=DEV)  # batch 0 sees nothing
    out, lse = _check(calls, 3, 4, 2, L, S, mask_mod=M.key_padding(lengths), mask_bh=(3, None))
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()


def test_documents_per_batch(calls):
    S, L = 300, 2
    ids = torch.stack(
        [
            torch.repeat_interleave(torch.arange(3), torch.tensor([100, 150, 50])),
            torch.repeat_interleave(torch.arange(2), torch.tensor([20, 280])),
        ]
    ).to(DEV)
    off = S - L

    def doc_decode(b, h, q_idx, kv_idx):
        return (ids[b, q_idx + off] == ids[b, kv_idx]) & (q_idx + off >= kv_idx)

    _check(calls, 2, 4, 4, L, S, mask_mod=doc_decode, mask_bh=(2, None))


def test_head_dependent_mask_broadcast_lists(calls):
    # the BlockMask is built for h = 0 (H broadcast): every listed block is partial, so the
    # per-row head tile of the mask code decides; lens[h] is a gather
    S, L = 300, 1
    lens = torch.tensor([300, 250, 120, 64, 299, 10], device=DEV)

    def per_head(b, h, q_idx, kv_idx):
        return (kv_idx % 5 != h % 3) & (kv_idx < lens[h])

    _check(calls, 1, 6, 2, L, S, mask_mod=per_head, compare_regular=True)


def test_per_head_mask_group_1(calls):
    S, L = 300, 2
    lens = torch.tensor([300, 70, 0], device=DEV)  # head 2 sees nothing

    def head_len(b, h, q_idx, kv_idx):
        return kv_idx < lens[h] - q_idx

    out, lse = _check(calls, 1, 3, 3, L, S, mask_mod=head_len, mask_bh=(None, 3))
    assert torch.isneginf(lse[:, 2]).all() and (out[:, 2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16])
def test_low_precision_ragged_head_dims(calls, dtype):
    S, L = 290, 3
    _check(calls, 1, 4, 2, L, S, E=24, Ev=40, mask_mod=M.causal(S - L), dtype=dtype)


def test_no_mask_full_blocks_only(calls):
    _check(calls, 1, 4, 1, 1, 257, block=(16, 32), splits=5)


# ------------------------------------------------------------------ dispatch
def _dispatch(
    calls,
    *,
    Hq=4,
    Hkv=2,
    L=1,
    S=300,
    grad=False,
    no_grad=False,
    mask_h=None,
    opts=None,
    block=(16, 64),
):
    q, k, v = _inputs(1, Hq, Hkv, L, S, 16, 16, torch.float32)
    for t in (q, k, v):
        t.requires_grad_(grad)
    bm = create_block_mask(M.causal(S - L), None, mask_h, L, S, device=DEV, BLOCK_SIZE=block)
    n = dict(calls)
    with torch.set_grad_enabled(not no_grad):
        _run(q, k, v, None, bm, opts or {})
    used = calls["decode"] - n["decode"]
    assert used + calls["fwd"] - n["fwd"] == 1
    return used == 1


def test_dispatch_rule(calls):
    assert _dispatch(calls)  # auto: L = 1, S = 300 >= DECODE_MIN_S
    assert _dispatch(calls, S=200)  # short kv too (DECODE_MIN_S = 1)
    assert _dispatch(calls, S=200, opts={"decode": True})
    assert not _dispatch(calls, opts={"decode": False})
    assert not _dispatch(calls, grad=True)  # gradient needed
    assert _dispatch(calls, grad=True, no_grad=True)
    assert not _dispatch(calls, Hq=32, Hkv=1, L=4)  # L * GROUP = 128 rows
    assert _dispatch(calls, Hq=16, Hkv=1, L=4)  # 64 rows
    assert not _dispatch(calls, Hq=4, Hkv=2, mask_h=4)  # per-head lists inside a group
    assert _dispatch(calls, Hq=4, Hkv=4, mask_h=4)  # GROUP == 1: per-head lists are fine
    assert not _dispatch(calls, L=32, Hq=2, Hkv=2, opts={"decode": True})  # L > Q_BLOCK


def test_bad_options():
    q, k, v = _inputs(1, 2, 2, 1, 300, 16, 16, torch.float32)
    bm = create_block_mask(noop_mask, None, None, 1, 300, device=DEV, BLOCK_SIZE=(16, 64))
    with pytest.raises(ValueError, match="decode"):
        _run(q, k, v, None, bm, {"decode": "yes"})
    with pytest.raises(ValueError, match="split_kv"):
        _run(q, k, v, None, bm, {"split_kv": 0})


def test_choose_decode_config():
    cpu = torch.device("cpu")
    cfg = flex_decode.choose_decode_config((9, 0), cpu, torch.bfloat16, 8, 16, 8, 1, 2049, 128, 128)
    assert cfg.BLOCK_M == 16 and 128 % cfg.BLOCK_N == 0
    items = math.ceil(2049 / 128) * (128 // cfg.BLOCK_N)
    assert 1 <= cfg.num_splits and items // cfg.num_splits >= 256 // cfg.BLOCK_N
    assert (
        flex_decode.choose_decode_config(
            None, cpu, torch.float32, 1, 4, 2, 4, 300, 16, 64, num_splits=1000
        ).num_splits
        == 5
    )  # clamped to the work items
    assert (
        flex_decode.choose_decode_config(None, cpu, torch.float32, 1, 64, 1, 1, 300, 16, 64).BLOCK_M
        == 64
    )


# ------------------------------------------------------------------ prepare fast path
def test_prepare_fast_path_takes_current_captures(calls):
    S, L = 300, 1
    q, k, v = _inputs(1, 4, 2, L, S, 16, 16, torch.float32)
    bm = create_block_mask(M.causal(S - L), None, None, L, S, device=DEV, BLOCK_SIZE=(16, 64))
    outs = []
    for scale_h in (0.5, -2.0):
        slopes = torch.full((4,), scale_h, device=DEV)  # new closure, new values each time
        sm = M.alibi(slopes)
        out, lse = _run(q, k, v, sm, bm, {})
        r_out, _ = reference_attention(q, k, v, sm, M.causal(S - L), None, True)
        b_out, _ = reference_attention(
            q, k, v, sm, M.causal(S - L), None, True, compute_dtype=torch.float32
        )
        assert_close_by_ratio(out, r_out, b_out, "out")
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1])


def test_prepare_fast_path_sees_changed_constant():
    state = {"off": 3}

    def shifted(b, h, q_idx, kv_idx):
        return q_idx + state["off"] >= kv_idx

    args = ((1, 2, 4, 16), (1, 2, 64, 16), torch.float32, torch.device(DEV), None, shifted, 16, 16)
    p1 = tb.prepare(*args, {})
    assert tb.prepare(*args, {}).kernel_id == p1.kernel_id  # cached
    state["off"] = 7  # a Python constant of the mod changed: a different kernel
    assert tb.prepare(*args, {}).kernel_id != p1.kernel_id


# ------------------------------------------------------------------ torch.compile
def test_torch_compile_decode_op(calls):
    S, L = 300, 1
    q, k, v = _inputs(1, 4, 2, L, S, 16, 16, torch.float32)
    bm = create_block_mask(M.causal(S - L), None, None, L, S, device=DEV, BLOCK_SIZE=(16, 64))

    def f(q, k, v):
        return flex_attention(
            q, k, v, None, bm, enable_gqa=True, kernel_options={"backend": "triton"}
        )

    eager = f(q, k, v)
    torch._dynamo.reset()
    n = calls["decode"]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert calls["decode"] > n
    torch.testing.assert_close(compiled, eager)


# ------------------------------------------------------------------ CUDA (device machine)
@pytest.mark.cuda
@pytest.mark.parametrize("L", [1, 4])
@pytest.mark.parametrize("alibi", [False, True])
def test_cuda_llama_decode_bf16(calls, L, alibi):
    B, Hq, Hkv, S, D = 8, 16, 8, 2049, 128
    sm = None
    if alibi:
        sm = M.alibi(torch.as_tensor(M.alibi_slopes_bloom(Hq), dtype=torch.float32).to(DEV))
    _check(
        calls,
        B,
        Hq,
        Hkv,
        L,
        S,
        E=D,
        Ev=D,
        score_mod=sm,
        mask_mod=M.causal(S - L),
        block=(128, 128),
        dtype=torch.bfloat16,
    )


@pytest.mark.cuda
def test_cuda_decode_gqa4_padding_fp16(calls):
    B, Hq, Hkv, S, D, L = 4, 32, 8, 4097, 64, 2
    lengths = torch.tensor([4097, 1000, 0, 3000], device=DEV)
    _check(
        calls,
        B,
        Hq,
        Hkv,
        L,
        S,
        E=D,
        Ev=D,
        mask_mod=M.key_padding(lengths),
        mask_bh=(B, None),
        block=(128, 128),
        dtype=torch.float16,
    )


# ------------------------------------------------------------------ zoo through the decode kernel
def _zoo():
    try:
        from zoo import ZOO
    except ImportError:  # pragma: no cover
        return []
    return ZOO


@pytest.mark.parametrize("case", _zoo(), ids=lambda c: c.name)
def test_zoo_decode_rows(calls, case):
    """Every zoo mod on its first few query rows, forced through the decode kernel."""
    import dataclasses

    from zoo import make_block_mask

    c = dataclasses.replace(case, L=min(case.L, 4 if case.Hq // case.Hkv <= 4 else 2))
    score_mod, mask_mod, _ = c.build(torch.device(DEV))
    q, k, v = _inputs(c.B, c.Hq, c.Hkv, c.L, c.S, c.E, c.Ev, torch.float32)
    bm = make_block_mask(c, mask_mod, DEV)
    n = calls["decode"]
    with torch.no_grad():
        out, lse = _run(q, k, v, score_mod, bm, {"decode": True, "split_kv": 3}, c.scale)
        r_out, r_lse = reference_attention(q, k, v, score_mod, mask_mod, c.scale, c.gqa)
        b_out, b_lse = reference_attention(
            q, k, v, score_mod, mask_mod, c.scale, c.gqa, compute_dtype=torch.float32
        )
    assert calls["decode"] == n + 1
    assert_close_by_ratio(out, r_out, b_out, "out")
    assert_close_by_ratio(lse, r_lse, b_lse, "lse")


def test_torch_compile_decode_dynamic_shapes(calls):
    # dynamic=True (what dynamo switches to after a recompile): symbolic B, S must not reach
    # the constant-folded preparation; the op picks its splits from the real shapes
    torch._dynamo.reset()

    def f(q, k, v, bm):
        return flex_attention(
            q, k, v, None, bm, enable_gqa=True, kernel_options={"backend": "triton"}
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, S in ((1, 300), (2, 333), (1, 420)):
        q, k, v = _inputs(B, 4, 2, 1, S, 16, 16, torch.float32)
        bm = create_block_mask(M.causal(S - 1), None, None, 1, S, device=DEV, BLOCK_SIZE=(16, 64))
        n = calls["decode"]
        got = compiled(q, k, v, bm)
        assert calls["decode"] > n
        torch.testing.assert_close(got, f(q, k, v, bm))


@pytest.mark.cuda
def test_cuda_direct_launch_repeated_calls_fresh_and_misaligned_tensors(calls):
    # after the first call the launcher skips Triton's binding and calls the compiled kernel
    # directly; fresh tensors, a changed length and 16-byte-misaligned views must still be
    # right (a misaligned pointer is another specialisation, so another compiled kernel)
    from hf_flexattn.kernels import _launch

    B, Hq, Hkv, D = 4, 8, 2, 64
    sm = M.alibi(torch.linspace(0.1, 0.8, Hq, device=DEV))
    direct = _launch.stats["direct"]
    for i, (S, shift) in enumerate([(1000, 0), (1000, 0), (1000, 0), (1001, 0), (1000, 3)]):
        q, k, v = _inputs(B, Hq, Hkv, 1, S + shift, D, D, torch.float16, seed=i)
        if shift:  # views that start `shift` elements in: not 16-byte aligned
            k, v = k[:, :, shift:], v[:, :, shift:]
            q = torch.randn(B * Hq * D + shift, device=DEV, dtype=torch.float16)[shift:]
            q = q.view(B, Hq, 1, D)
        bm = create_block_mask(M.causal(S - 1), None, None, 1, S, device=DEV)
        out, lse = _run(q, k, v, sm, bm, {"decode": True}, None)
        r_out, r_lse = reference_attention(q, k, v, sm, bm.mask_mod, None, True)
        b_out, b_lse = reference_attention(
            q, k, v, sm, bm.mask_mod, None, True, compute_dtype=torch.float16
        )
        assert_close_by_ratio(out, r_out, b_out, f"out[{i}]")
        assert_close_by_ratio(lse, r_lse, b_lse, f"lse[{i}]")
    assert not _launch._disabled
    assert _launch.stats["direct"] >= direct + 2  # the repeated calls went direct


# ------------------------------------------------------------------ stored decode plans
TR = {"backend": "triton"}


def _plan_setup(S=300, sm_vals=(0.1, 0.5)):
    slopes = torch.tensor(sm_vals, device=DEV).repeat_interleave(2)  # 4 query heads
    sm = M.alibi(slopes)
    bm = create_block_mask(M.causal(S - 1), None, None, 1, S, device=DEV, BLOCK_SIZE=(16, 64))
    return sm, slopes, bm


@pytest.fixture
def plan_calls(monkeypatch):
    """One entry per call of a stored :class:`DecodePlan`."""
    used = []
    real = flex_decode.DecodePlan.__call__
    monkeypatch.setattr(
        flex_decode.DecodePlan, "__call__", lambda self, *a: used.append(1) or real(self, *a)
    )
    return used


def _ref_check(out, q, k, v, sm, bm, tag):
    r, _ = reference_attention(q, k, v, sm, bm.mask_mod, None, True)
    b, _ = reference_attention(q, k, v, sm, bm.mask_mod, None, True, compute_dtype=q.dtype)
    assert_close_by_ratio(out, r, b, tag)


def test_repeated_decode_call_uses_the_stored_plan_with_new_tensors(plan_calls):
    # the second call with the same BlockMask, mods and shapes (another layer, say) runs the
    # plan stored by the first: fresh q/k/v and in-place changes to captured tensors count
    S = 300
    sm, slopes, bm = _plan_setup(S)
    used = plan_calls
    for i in range(3):
        q, k, v = _inputs(2, 4, 2, 1, S, 16, 16, torch.float32, seed=10 + i)
        if i == 2:
            slopes.mul_(2.0)  # the mod reads the tensor's current values
        out = flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR, return_lse=True)
        _ref_check(out[0], q, k, v, sm, bm, f"call {i}")
        r_lse = reference_attention(q, k, v, sm, bm.mask_mod, None, True)[1]
        b_lse = reference_attention(q, k, v, sm, bm.mask_mod, None, True, compute_dtype=q.dtype)[1]
        assert_close_by_ratio(out[1], r_lse, b_lse, f"lse {i}")
        out = flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)  # no lse
        _ref_check(out, q, k, v, sm, bm, f"call {i}, no lse")
    assert len(getattr(bm, tb._PLANS_ATTR)) == 1
    assert len(used) == 5  # the first call stored the plan, the next five ran it


def test_a_decode_plan_is_not_used_once_the_mask_parts_are_reassigned(plan_calls):
    # a plan binds the BlockMask's kv-side tensors and mask_mod: after one of them is
    # replaced, the call takes the normal path (and stores a plan for the new parts)
    S = 300
    sm, _, bm = _plan_setup(S)
    used = plan_calls
    q, k, v = _inputs(2, 4, 2, 1, S, 16, 16, torch.float32, seed=3)
    flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
    flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
    assert len(used) == 1
    bm.kv_num_blocks = bm.kv_num_blocks.clone()
    _ref_check(flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR), q, k, v,
               sm, bm, "new kv_num_blocks")
    assert len(used) == 1
    bm.mask_mod = M.causal(S - 9)  # the last 8 keys hidden (on the partial last tile)
    _ref_check(flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR), q, k, v,
               sm, bm, "new mask_mod")
    assert len(used) == 1
    _ref_check(flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR), q, k, v,
               sm, bm, "again: the new plan")
    assert len(used) == 2


def test_decode_output_is_stored_like_the_query(calls):
    # L > 1 rows of a [B, L, H, D] query (Transformers' layout): the output of the first call
    # (which stores the plan) and of the plan's calls is laid out like q, so the caller's
    # out.transpose(1, 2) is contiguous without a copy
    S, L = 300, 4
    slopes = torch.tensor([0.1, 0.5], device=DEV).repeat_interleave(2)
    sm = M.alibi(slopes)
    bm = create_block_mask(M.causal(S - L), None, None, L, S, device=DEV, BLOCK_SIZE=(16, 64))
    for i in range(2):
        q, k, v = _inputs(2, 4, 2, L, S, 16, 16, torch.float32, seed=20 + i)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, L, E] view of [B, L, Hq, E]
        before = calls["decode"]
        out = flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
        assert calls["decode"] == before + 1
        assert out.shape == (2, 4, L, 16) and out.transpose(1, 2).is_contiguous(), i
        _ref_check(out, q, k, v, sm, bm, f"call {i}")
    assert getattr(bm, tb._PLANS_ATTR)


@pytest.mark.parametrize("L, order", [(4, "blhd"), (1, "bhld"), (4, "bhld")])
def test_plan_returns_transformers_layout_directly(calls, L, order):
    # run_plan(blhd=True), the Transformers integration's call: out is [B, L, Hq, Ev], and
    # allocated so (contiguous, no transpose) wherever its memory is what the launch writes:
    # q in [B, L, Hq, E] memory, or one query row in any order. Otherwise a transposed view
    S = 300
    slopes = torch.tensor([0.1, 0.5], device=DEV).repeat_interleave(2)
    sm = M.alibi(slopes)
    bm = create_block_mask(M.causal(S - L), None, None, L, S, device=DEV, BLOCK_SIZE=(16, 64))
    for i in range(2):
        q, k, v = _inputs(2, 4, 2, L, S, 16, 16, torch.float32, seed=30 + i)
        if order == "blhd":
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        if i == 0:  # stores the plan
            flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
            continue
        out, lse = tb.run_plan(q, k, v, sm, bm, None, True, TR, False, True)
        assert lse is None and out.shape == (2, L, 4, 16)
        assert out.is_contiguous() == (order == "blhd" or L == 1)
        _ref_check(out.transpose(1, 2), q, k, v, sm, bm, f"{order} L={L}")


def test_stored_plan_is_not_used_where_validation_or_grad_matters(calls):
    S = 300
    sm, _, bm = _plan_setup(S)
    q, k, v = _inputs(2, 4, 2, 1, S, 16, 16, torch.float32)
    flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
    assert getattr(bm, tb._PLANS_ATTR)
    with pytest.raises(ValueError, match="enable_gqa"):
        flex_attention(q, k, v, sm, bm, kernel_options=TR)  # GQA needs enable_gqa still
    with pytest.raises(TypeError, match="dtype"):  # same shapes, another dtype: validated
        flex_attention(q, k.double(), v, sm, bm, enable_gqa=True, kernel_options=TR)
    with pytest.raises(TypeError, match="scale"):
        flex_attention(q, k, v, sm, bm, scale="0.5", enable_gqa=True, kernel_options=TR)
    # inputs that need a gradient take the regular (differentiable) kernels
    qg = q.clone().requires_grad_()
    n_fwd = calls["fwd"]
    out = flex_attention(qg, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
    out.sum().backward()
    assert calls["fwd"] == n_fwd + 1 and qg.grad is not None
    # another shape or kernel_options: no plan
    before = calls["decode"]
    q2, k2, v2 = _inputs(3, 4, 2, 1, S, 16, 16, torch.float32)
    out2 = flex_attention(q2, k2, v2, sm, bm, enable_gqa=True, kernel_options=dict(TR, split_kv=2))
    _ref_check(out2, q2, k2, v2, sm, bm, "other shape")
    assert calls["decode"] == before + 1


def test_no_plan_for_mods_that_may_change():
    # a user closure is re-examined on every call (its captured names may be rebound), so
    # nothing is stored for it
    S = 300
    state = {"off": S - 1}

    def user_causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + state["off"]

    bm = create_block_mask(user_causal, None, None, 1, S, device=DEV, BLOCK_SIZE=(16, 64))
    q, k, v = _inputs(1, 2, 2, 1, S, 16, 16, torch.float32)
    flex_attention(q, k, v, None, bm, kernel_options={"backend": "triton"})
    assert not getattr(bm, tb._PLANS_ATTR, None)


# ------------------------------------------------------------------ mod families, templates
def _member(shift: torch.Tensor, pad: torch.Tensor, declared=None):
    """A member of a test family: causal with offset ``shift`` (0-d) and key padding."""

    def fam_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + shift) & (pad[b, kv_idx] != 0)

    return freeze_family(fam_mask, ("test.family",), declared or (shift, pad))


def _step_mask(S: int, lefts=(0, 37), declared_order=None):
    """One decoding step's mask: query at S - 1, batch 2, left padding ``lefts``."""
    shift = torch.tensor(S - 1, device=DEV)
    pad = torch.ones(2, S, dtype=torch.bool, device=DEV)
    for b, n in enumerate(lefts):
        pad[b, :n] = False
    declared = None if declared_order is None else declared_order(shift, pad)
    mm = _member(shift, pad, declared)
    return create_block_mask(mm, 2, None, 1, S, device=DEV, BLOCK_SIZE=(16, 64)), mm


def test_family_members_share_one_kernel_with_their_own_captures(calls, monkeypatch):
    # a new member (other offset, other padding tensor) is prepared by lookup: the same kernel
    # id, this member's tensors (not the first member's), and results that match fp64
    slow = []
    real_slow = tb._prepare_slow
    monkeypatch.setattr(tb, "_prepare_slow", lambda *a, **k: slow.append(1) or real_slow(*a, **k))
    monkeypatch.setattr(tb, "_fast_key", lambda *a, **k: None)  # no structural walk either
    kids = []
    for S, lefts in ((300, (0, 37)), (301, (5, 0)), (302, (0, 200))):
        bm, mm = _step_mask(S, lefts)
        opts = dict(TR, decode=True)
        prep = tb.prepare((2, 4, 1, 16), (2, 2, S, 16), torch.float32, torch.device(DEV), None,
                          mm, 16, 64, opts)
        kids.append(prep.kernel_id)
        assert prep.mask_captures[1] is mm._hf_flexattn_family[1][1]
        q, k, v = _inputs(2, 4, 2, 1, S, 16, 16, torch.float32, seed=S)
        out = flex_attention(q, k, v, None, bm, enable_gqa=True, kernel_options=opts)
        _ref_check(out, q, k, v, None, bm, f"S={S}")
    assert len(set(kids)) == 1 and len(slow) == 1


def test_family_declaring_other_captures_is_prepared_the_slow_way(caplog, monkeypatch):
    # captures declared in another order than the compiler finds them: never trusted
    monkeypatch.setattr(tb, "_warned", set())
    for S in (300, 301):
        bm, _ = _step_mask(S, declared_order=lambda shift, pad: (pad, shift))
        q, k, v = _inputs(2, 4, 2, 1, S, 16, 16, torch.float32, seed=S)
        opts = dict(TR, decode=True)
        out = flex_attention(q, k, v, None, bm, enable_gqa=True, kernel_options=opts)
        _ref_check(out, q, k, v, None, bm, f"S={S}")
    assert "declares other captured tensors" in caplog.text


def test_next_steps_plan_comes_from_the_template(calls, monkeypatch):
    # decoding: each step a new mask (one key more, new tensors); after the first step the
    # first call of a step builds its plan from the stored template (no validation, no
    # preparation), the next calls run that plan; every result matches fp64
    sm = M.alibi(torch.tensor([0.1, 0.5], device=DEV).repeat_interleave(2))
    tb.clear_templates()
    made = []
    real = tb._plan_from_template
    monkeypatch.setattr(tb, "_plan_from_template", lambda *a: made.append(real(*a)) or made[-1])
    for step, S in enumerate(range(300, 305)):
        bm, _ = _step_mask(S, lefts=(step, 40))
        before = calls["decode"]
        n_prep = len(made)
        for layer in range(3):
            q, k, v = _inputs(2, 4, 2, 1, S, 16, 16, torch.float32, seed=10 * S + layer)
            with torch.no_grad() if layer else contextlib.nullcontext():  # either mode
                out = flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
            _ref_check(out, q, k, v, sm, bm, f"step {step} layer {layer}")
        assert calls["decode"] == before + 3
        if step > 0:
            assert made[n_prep] is not None, "no plan from the template"
    assert len(tb._TEMPLATES) == 1


def test_template_plans_pass_their_own_tensors_as_pointers_to_direct_launches(monkeypatch):
    # a step's plan from the template: direct launches get the BlockMask's and the mask's
    # captured tensors as raw pointers, the score_mod's captures (a user's tensors) as
    # tensors; Triton's own path gets every tensor
    sm = M.alibi(torch.tensor([0.1, 0.5], device=DEV).repeat_interleave(2))
    tb.clear_templates()
    made = []
    real = tb._plan_from_template
    monkeypatch.setattr(tb, "_plan_from_template", lambda *a: made.append(real(*a)) or made[-1])
    for S in (300, 301):
        bm, mm = _step_mask(S)
        q, k, v = _inputs(2, 4, 2, 1, S, 16, 16, torch.float32, seed=S)
        with torch.no_grad():
            flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
    plan = made[-1]
    assert plan is not None
    bound = plan.split
    score_caps = {id(t) for t in tb._TEMPLATES[next(iter(tb._TEMPLATES))][2]}
    assert score_caps  # the ALiBi slopes
    own = {id(t) for t in (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                           bm.full_kv_indices, *mm._hf_flexattn_family[1])}
    assert len(bound.direct_tail) == len(bound.tail)
    n_ptr = 0
    for a, d in zip(bound.tail, bound.direct_tail):
        if isinstance(a, torch.Tensor) and id(a) in own:
            assert type(d) is int and d == a.data_ptr()
            n_ptr += 1
        elif isinstance(a, torch.Tensor):
            assert d is a  # a score_mod capture
        else:
            assert type(d) is type(a) and d == a
    assert n_ptr == 6  # 4 BlockMask tensors, the offset and the padding


@pytest.mark.cuda
def test_cuda_template_steps_launch_directly_from_their_first_call(calls):
    # a step's plan from the template shares its launch entry with the earlier steps of the
    # same specialisation: its very first launch skips Triton's binding (and is right)
    from hf_flexattn.kernels import _launch

    tb.clear_templates()
    for S in (400, 416, 432):  # the last two: 7 kv blocks, lengths divisible by 16
        bm, _ = _step_mask(S, lefts=(3, 40))
        triton_before, direct_before = _launch.stats["triton"], _launch.stats["direct"]
        for layer in range(3):
            q, k, v = _inputs(2, 4, 2, 1, S, 16, 16, torch.float16, seed=S + layer)
            with torch.no_grad():
                out = flex_attention(q, k, v, None, bm, enable_gqa=True, kernel_options=TR)
            _ref_check(out, q, k, v, None, bm, f"S={S} layer {layer}")
    assert _launch.stats["triton"] == triton_before
    assert _launch.stats["direct"] == direct_before + 3


def test_template_is_not_used_where_the_call_differs(calls, monkeypatch):
    sm = M.alibi(torch.tensor([0.1, 0.5], device=DEV).repeat_interleave(2))
    tb.clear_templates()
    bm, _ = _step_mask(300)
    q, k, v = _inputs(2, 4, 2, 1, 300, 16, 16, torch.float32)
    flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
    assert len(tb._TEMPLATES) == 1
    # a mask built for other lengths is still refused
    bm2, _ = _step_mask(301)
    q2, k2, v2 = _inputs(2, 4, 2, 1, 302, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="block_mask was built for"):
        flex_attention(q2, k2, v2, sm, bm2, enable_gqa=True, kernel_options=TR)
    # GQA still needs enable_gqa; another scale is another call
    q2, k2, v2 = _inputs(2, 4, 2, 1, 301, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="enable_gqa"):
        flex_attention(q2, k2, v2, sm, bm2, kernel_options=TR)
    out = flex_attention(q2, k2, v2, sm, bm2, scale=0.3, enable_gqa=True, kernel_options=TR)
    r, _ = reference_attention(q2, k2, v2, sm, bm2.mask_mod, 0.3, True)
    b, _ = reference_attention(q2, k2, v2, sm, bm2.mask_mod, 0.3, True, compute_dtype=q2.dtype)
    assert_close_by_ratio(out, r, b, "scale 0.3")
    # below a split threshold (256 here; the default is 1) the regular kernel runs, as
    # without a template
    monkeypatch.setattr(tb, "DECODE_MIN_S", 256)
    n_fwd = calls["fwd"]
    bm3, _ = _step_mask(200)
    q3, k3, v3 = _inputs(2, 4, 2, 1, 200, 16, 16, torch.float32)
    out3 = flex_attention(q3, k3, v3, sm, bm3, enable_gqa=True, kernel_options=TR)
    assert calls["fwd"] == n_fwd + 1
    _ref_check(out3, q3, k3, v3, sm, bm3, "short")


def test_learnable_score_mod_under_autograd_skips_the_stored_plan():
    # the plan was stored under no_grad; with autograd on, a score capture that requires grad
    # needs the differentiable kernels even though q, k and v do not
    S = 300
    slopes = torch.tensor([0.1, 0.5, 0.2, 0.3], device=DEV, requires_grad=True)
    sm = M.alibi(slopes)
    bm = create_block_mask(M.causal(S - 1), None, None, 1, S, device=DEV, BLOCK_SIZE=(16, 64))
    q, k, v = _inputs(2, 4, 2, 1, S, 16, 16, torch.float32)
    with torch.no_grad():
        flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
    assert getattr(bm, tb._PLANS_ATTR)
    out = flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
    assert out.requires_grad
    (g,) = torch.autograd.grad(out.sum(), [slopes])
    r, _ = reference_attention(q, k, v, sm, bm.mask_mod, None, True)
    (gr,) = torch.autograd.grad(r.sum(), [slopes])
    b, _ = reference_attention(q, k, v, sm, bm.mask_mod, None, True, compute_dtype=q.dtype)
    (gb,) = torch.autograd.grad(b.sum(), [slopes])
    assert_close_by_ratio(g, gr, gb, "dslopes")


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [2, 7, 33])
def test_cuda_last_split_combines_repeatedly(calls, splits):
    # the last split to arrive combines all of them in the same launch (an arrival counter
    # that resets itself); many launches in a row on fresh data check the ordering and reset
    B, Hq, Hkv, S, D = 3, 8, 4, 4000, 64
    bm = create_block_mask(M.causal(S - 1), None, None, 1, S, device=DEV)
    for i in range(20):
        q, k, v = _inputs(B, Hq, Hkv, 1, S, D, D, torch.bfloat16, seed=100 + i)
        out, lse = _run(q, k, v, None, bm, {"decode": True, "split_kv": splits})
        r_out, r_lse = reference_attention(q, k, v, None, bm.mask_mod, None, True)
        b_out, b_lse = reference_attention(
            q, k, v, None, bm.mask_mod, None, True, compute_dtype=torch.bfloat16
        )
        assert_close_by_ratio(out, r_out, b_out, f"out[{i}]")
        assert_close_by_ratio(lse, r_lse, b_lse, f"lse[{i}]")


def test_compiled_calls_do_not_cache_workspaces(calls):
    # the custom op may run in a CUDA-graph warm-up, whose allocations come from the graph's
    # pool: it must not leave them in the workspace cache that eager calls reuse
    S, L = 300, 1
    q, k, v = _inputs(1, 4, 2, L, S, 16, 16, torch.float32)
    bm = create_block_mask(M.causal(S - L), None, None, L, S, device=DEV, BLOCK_SIZE=(16, 64))

    def f(q, k, v):
        opts = {"backend": "triton"}
        return flex_attention(q, k, v, None, bm, enable_gqa=True, kernel_options=opts)

    flex_decode._WORKSPACE.clear()
    torch._dynamo.reset()
    n = calls["decode"]
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert calls["decode"] > n and not flex_decode._WORKSPACE
    torch.testing.assert_close(got, f(q, k, v))  # the eager call caches its workspace
    assert flex_decode._WORKSPACE


# ------------------------------------------------------------------ step successors
def _integration_steps(S_range, *, sm=None, q_strided_from=None, monkeypatch, calls):
    """Decoding steps as ``generate`` makes them: per step the integration's mask (one key
    more, a new padding tensor), then two layers' calls with new q/k/v. Returns, per step,
    whether the step's first call was planned from the last step's record."""
    mu = pytest.importorskip("transformers.masking_utils")
    from hf_flexattn.integrations import transformers as integ

    tb.clear_templates()
    got: list = []
    real = tb._Successor.next_plan

    def spy(self, *a):
        got.append(real(self, *a))
        return got[-1]

    monkeypatch.setattr(tb._Successor, "next_plan", spy)
    B, Hq, Hkv, E = 2, 4, 2, 16
    S_max = max(S_range)
    am = torch.ones(B, S_max, dtype=torch.long, device=DEV)
    am[1, :37] = 0  # left padding in row 1
    from_record = []
    for step, S in enumerate(S_range):
        n = len(got)
        mask = am[:, :S].clone()  # generate concatenates a new tensor each step
        with torch.no_grad():  # as in generate: the decoding step's mask
            bm = integ.flex_mask(B, 1, S, S - 1, 0, mu.causal_mask_function, mask,
                                 device=torch.device(DEV))
        for layer in range(2):
            q, k, v = _inputs(B, Hq, Hkv, 1, S, E, E, torch.float32, seed=100 * S + layer)
            if q_strided_from is not None and step >= q_strided_from:
                q = torch.cat([q, q], -1)[..., :E]  # other strides: another template
            before = calls["decode"]
            with torch.no_grad():
                out = flex_attention(q, k, v, sm, bm, enable_gqa=True, kernel_options=TR)
            assert calls["decode"] == before + 1
            _ref_check(out, q, k, v, sm, bm, f"S={S} layer {layer}")
        from_record.append(len(got) > n and got[n] is not None)
    return from_record


def test_decoding_steps_are_planned_from_the_last_step(calls, monkeypatch):
    # the first step stores the template, the second plans from it and records itself; each
    # later step's first call is planned from that record, except where the kv-block count
    # grows (S = 385: new index views), which goes through the template and records again
    clones = []
    real_clone = flex_decode.DecodeTemplate._clone
    monkeypatch.setattr(flex_decode.DecodeTemplate, "_clone",
                        lambda self, *a: clones.append(1) or real_clone(self, *a))
    steps = list(range(380, 390))
    from_record = _integration_steps(steps, monkeypatch=monkeypatch, calls=calls)
    expect = [S not in (380, 381, 385) for S in steps]
    assert from_record == expect
    # steps whose own arguments specialise like an earlier step's copy that step's plan
    assert clones


def test_step_record_is_not_used_where_the_call_differs(calls, monkeypatch):
    # from the fourth step on q comes with other strides: no plan from the record (nor from
    # the template: another layout is another template), every result still exact
    steps = list(range(300, 306))
    from_record = _integration_steps(steps, q_strided_from=3, monkeypatch=monkeypatch,
                                     calls=calls)
    assert from_record == [False, False, True, False, False, True]
    # another score_mod (ALiBi slopes) than the recorded one: the record is not used
    sm = M.alibi(torch.tensor([0.1, 0.5], device=DEV).repeat_interleave(2))
    from_record = _integration_steps(steps[:3], sm=sm, monkeypatch=monkeypatch, calls=calls)
    assert from_record == [False, False, True]


def test_capture_args_match_runtime_args():
    # the step record computes a mask's launch arguments from its new captures directly:
    # the same values as binding the ModCode to them
    from hf_flexattn.compiler import ModCode

    t1 = torch.arange(6.0).reshape(2, 3)[:, 1:]
    t2 = torch.tensor(5)
    code = ModCode(kind="mask", key=("k",), captured=[t1, t2], specs=[], params=["x"])
    args, ptrs = ModCode.capture_args([t1, t2])
    assert list(args) == code.runtime_args()
    assert list(ptrs) == code.runtime_args(pointers=True)


# ------------------------------------------------------------------ stored forward plans
def test_forward_plan_serves_later_calls_with_one_mask(calls, prepare_calls):
    # a prompt's layers: one BlockMask, the same shapes, new q/k/v each time. The first call
    # stores a plan on the mask; the others run it (no preparation), on the regular kernel,
    # with the right results and lse
    n = prepare_calls
    sm = M.alibi(torch.tensor([0.1, 0.3, 0.5, 0.7], device=DEV))
    B, Hq, Hkv, L = 2, 4, 2, 40
    bm = create_block_mask(M.causal(), None, None, L, L, device=DEV, BLOCK_SIZE=(16, 16))
    for layer in range(3):
        q, k, v = _inputs(B, Hq, Hkv, L, L, 16, 16, torch.float16, seed=layer)
        with torch.no_grad():
            out, lse = _run(q, k, v, sm, bm, {})
        r_out, r_lse = reference_attention(q, k, v, sm, bm.mask_mod, None, True)
        b_out, b_lse = reference_attention(
            q, k, v, sm, bm.mask_mod, None, True, compute_dtype=q.dtype
        )
        assert_close_by_ratio(out, r_out, b_out, f"out layer {layer}")
        assert_close_by_ratio(lse, r_lse, b_lse, f"lse layer {layer}")
    assert calls["fwd"] == 3 and calls["decode"] == 0
    assert n["prepare"] == 1
    plans = getattr(bm, tb._PLANS_ATTR)
    assert [type(p[0]) for p in plans.values()] == [tb._FwdPlan]


def test_forward_plan_is_not_used_where_the_call_differs(calls, prepare_calls):
    n = prepare_calls
    B, Hq, Hkv, L = 1, 4, 2, 40
    bm = create_block_mask(M.causal(), None, None, L, L, device=DEV, BLOCK_SIZE=(16, 16))
    q, k, v = _inputs(B, Hq, Hkv, L, L, 16, 16, torch.float32)
    with torch.no_grad():
        _run(q, k, v, None, bm, {})
    assert n["prepare"] == 1
    # other head counts, another scale, another score_mod: the normal path (and a plan each)
    q2, k2, v2 = _inputs(B, 2, 2, L, L, 16, 16, torch.float32, seed=1)
    sm = M.alibi(torch.tensor([0.2, 0.4, 0.6, 0.8], device=DEV))
    with torch.no_grad():
        _ref_check(_run(q2, k2, v2, None, bm, {})[0], q2, k2, v2, None, bm, "heads")
        out, _ = _run(q, k, v, None, bm, {}, scale=0.3)
        _ref_check(_run(q, k, v, sm, bm, {})[0], q, k, v, sm, bm, "score_mod")
    r, _ = reference_attention(q, k, v, None, bm.mask_mod, 0.3, True)
    b, _ = reference_attention(q, k, v, None, bm.mask_mod, 0.3, True, compute_dtype=q.dtype)
    assert_close_by_ratio(out, r, b, "scale")
    assert n["prepare"] == 4
    # gradients needed: the differentiable path, and a backward that matches fp64
    qg = q.clone().requires_grad_()
    out = _run(qg, k, v, None, bm, {})[0]
    out.sum().backward()
    assert n["prepare"] == 5 and qg.grad is not None
    qr = q.double().requires_grad_()
    r_out, _ = reference_attention(qr, k.double(), v.double(), None, bm.mask_mod, None, True)
    r_out.sum().backward()
    torch.testing.assert_close(qg.grad.double(), qr.grad, atol=1e-4, rtol=1e-4)
    # the mask's mask_mod or tensors reassigned: the plan does not apply. Only partial tiles
    # read mask_mod, so the expected result is a fresh mask with the same tensors and the
    # new mod (the normal path), and it must differ from the old mod's
    with torch.no_grad():
        old = _run(q, k, v, None, bm, {})[0]
        new_mod = M.causal(-3)  # q_idx - 3 >= kv_idx: differs on the diagonal tiles only
        bm.mask_mod = new_mod
        got = _run(q, k, v, None, bm, {})[0]
        fresh = create_block_mask(M.causal(), None, None, L, L, device=DEV, BLOCK_SIZE=(16, 16))
        fresh.mask_mod = new_mod
        expect = _run(q, k, v, None, fresh, {})[0]
    assert n["prepare"] == 7
    torch.testing.assert_close(got, expect, atol=0, rtol=0)
    assert not torch.equal(got, old)
    bm.kv_num_blocks = bm.kv_num_blocks.clone()
    with torch.no_grad():
        torch.testing.assert_close(_run(q, k, v, None, bm, {})[0], expect, atol=0, rtol=0)
    assert n["prepare"] == 8
    # tuning options: never a plan
    with torch.no_grad():
        _run(q, k, v, None, bm, {"BLOCK_M": 16, "BLOCK_N": 16})
        _run(q, k, v, None, bm, {"BLOCK_M": 16, "BLOCK_N": 16})
    assert n["prepare"] == 10
