"""The ready mod library (hf_flexattn.mods) against dense float64 / boolean formulas.

Every mod is evaluated over full ``[B, H, L, S]`` index grids twice: through torch's own
vmap path (``torch.nn.attention.flex_attention.create_mask`` for masks, torch's
``_vmap_for_bhqkv`` for score mods) and through ``hf_flexattn._mod_eval``.  The references
are written here with numpy broadcasting or explicit loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask as torch_create_mask

from hf_flexattn import mods
from hf_flexattn._mod_eval import _BroadcastGuard, eval_mask_mod, eval_score_mod

HEAD_COUNTS = list(range(1, 21)) + [32, 40, 64, 71, 80, 128]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def np_grid(B: int, H: int, L: int, S: int) -> tuple[np.ndarray, ...]:
    return (
        np.arange(B).reshape(B, 1, 1, 1),
        np.arange(H).reshape(1, H, 1, 1),
        np.arange(L).reshape(1, 1, L, 1),
        np.arange(S).reshape(1, 1, 1, S),
    )


def idx(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long)


def masks_both_ways(mod, B: int, H: int, L: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch's create_mask, our eval_mask_mod), both bool [B, H, L, S]."""
    ref_torch = torch_create_mask(mod, B, H, L, S, device="cpu")
    ours = eval_mask_mod(mod, idx(B), idx(H), idx(L), idx(S))
    return ref_torch, ours


def torch_vmap_score(mod, score: torch.Tensor) -> torch.Tensor:
    """score_mod evaluated like torch does (nested vmap under TransformGetItemToIndex)."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv

    B, H, L, S = score.shape
    with TransformGetItemToIndex():
        return _vmap_for_bhqkv(mod, prefix=(0,))(score, idx(B), idx(H), idx(L), idx(S))


def assert_broadcast_safe(mod, score: bool, shape: tuple[int, int, int, int]) -> None:
    """The mod stays in the elementwise subset when evaluated on broadcast tiles."""
    B, H, L, S = shape
    inputs = (
        idx(B).view(-1, 1, 1, 1),
        idx(H).view(1, -1, 1, 1),
        idx(L).view(1, 1, -1, 1),
        idx(S).view(1, 1, 1, -1),
    )
    if score:
        inputs = (torch.zeros(B, H, L, S, dtype=torch.float64),) + inputs
    guard = _BroadcastGuard(inputs)
    with guard:
        mod(*inputs)
    assert guard.safe, f"{mod.__name__} is not broadcast-safe: {guard.reason}"


def check_mask(mod, expected: np.ndarray) -> None:
    expected_t = torch.from_numpy(np.array(expected, dtype=bool))
    B, H, L, S = expected_t.shape
    ref_torch, ours = masks_both_ways(mod, B, H, L, S)
    assert ours.dtype == torch.bool and ref_torch.dtype == torch.bool
    assert torch.equal(ref_torch, expected_t), f"{mod.__name__}: torch's vmap path differs"
    assert torch.equal(ours, expected_t), f"{mod.__name__}: eval_mask_mod differs"
    assert_broadcast_safe(mod, False, (B, H, L, S))


# --------------------------------------------------------------------------------------------
# mask mods
# --------------------------------------------------------------------------------------------
DOC_IDS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, -1, -1]  # 12 tokens, 2 trailing padding


def _doc_ref(ids: np.ndarray, causal: bool, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Explicit loops; ``ids`` [S] or [B, S]."""
    B, H, L, S = shape
    out = np.zeros(shape, dtype=bool)
    for b in range(B):
        row = ids if ids.ndim == 1 else ids[b]
        for i in range(L):
            for j in range(S):
                ok = row[i] == row[j] and row[i] != -1
                out[b, :, i, j] = ok and (i >= j or not causal)
    return out


def _mask_cases() -> list[tuple[str, object, np.ndarray]]:
    cases = []

    def add(name, mod, shape, fn):
        b, h, q, kv = np_grid(*shape)
        cases.append((name, mod, np.broadcast_to(fn(b, h, q, kv), shape)))

    add("causal_mask", mods.causal_mask, (1, 1, 13, 13), lambda b, h, q, kv: q >= kv)
    add("causal_mask_cross", mods.causal_mask, (2, 3, 5, 11), lambda b, h, q, kv: q >= kv)
    add("causal_0", mods.causal(), (1, 2, 9, 9), lambda b, h, q, kv: q >= kv)
    add("causal_offset_7", mods.causal(7), (1, 1, 4, 11), lambda b, h, q, kv: q + 7 >= kv)
    add("causal_offset_-2", mods.causal(-2), (1, 1, 8, 8), lambda b, h, q, kv: q - 2 >= kv)
    for w in (1, 4, 20):
        add(
            f"sliding_window_{w}",
            mods.sliding_window(w),
            (1, 1, 17, 17),
            lambda b, h, q, kv, w=w: (q - w < kv) & (kv <= q),
        )
        add(
            f"bidirectional_window_{w}",
            mods.sliding_window(w, causal=False),
            (1, 1, 17, 17),
            lambda b, h, q, kv, w=w: np.abs(q - kv) < w,
        )
    add(
        "sliding_window_offset",
        mods.sliding_window(3, offset=6),
        (2, 1, 5, 11),
        lambda b, h, q, kv: (q + 6 - 3 < kv) & (kv <= q + 6),
    )
    add(
        "bidirectional_window_offset",
        mods.sliding_window(3, causal=False, offset=6),
        (1, 1, 5, 14),
        lambda b, h, q, kv: np.abs(q + 6 - kv) < 3,
    )
    for c in (1, 5, 8):
        add(
            f"chunked_{c}",
            mods.chunked(c),
            (1, 2, 17, 17),
            lambda b, h, q, kv, c=c: (q // c == kv // c) & (q >= kv),
        )
        add(
            f"bidirectional_chunked_{c}",
            mods.chunked(c, causal=False),
            (1, 1, 17, 19),
            lambda b, h, q, kv, c=c: q // c == kv // c,
        )

    ids = np.array(DOC_IDS)
    for causal in (False, True):
        cases.append(
            (
                f"document_1d_causal={causal}",
                mods.document_mask(torch.tensor(DOC_IDS), causal=causal),
                _doc_ref(ids, causal, (1, 2, 12, 12)),
            )
        )
        # [B, S] ids in int32, non-contiguous reuse of an id (documents are ids, not runs)
        ids2 = np.array([[0, 0, 1, 1, 1, 0, 2, -1], [-1, -1, 0, 0, 0, 0, 1, 1]])
        cases.append(
            (
                f"document_2d_causal={causal}",
                mods.document_mask(torch.tensor(ids2, dtype=torch.int32), causal=causal),
                _doc_ref(ids2, causal, (2, 1, 8, 8)),
            )
        )
    # offsets [0, 3, 3, 7, 9] over 11 tokens: docs 0 (0..2), 1 (empty), 2 (3..6), 3 (7..8), pad
    off_ids = np.array([0, 0, 0, 2, 2, 2, 2, 3, 3, -1, -1])
    for causal in (False, True):
        cases.append(
            (
                f"documents_from_offsets_causal={causal}",
                mods.documents_from_offsets(torch.tensor([0, 3, 3, 7, 9]), 11, causal=causal),
                _doc_ref(off_ids, causal, (1, 1, 11, 11)),
            )
        )
    pid = [0, 1, 2, 0, 1, 5, 6, 0, 0, 1]  # docs: [0,1,2] [0,1] [5,6] [0] [0,1]
    pid_ids = np.array([0, 0, 0, 1, 1, 2, 2, 3, 4, 4])
    for causal in (False, True):
        cases.append(
            (
                f"documents_from_position_ids_causal={causal}",
                mods.documents_from_position_ids(torch.tensor(pid), causal=causal),
                _doc_ref(pid_ids, causal, (1, 1, 10, 10)),
            )
        )

    add(
        "prefix_lm_int",
        mods.prefix_lm(4),
        (1, 1, 10, 10),
        lambda b, h, q, kv: (kv < 4) | (q >= kv),
    )
    prefix = np.array([3, 0, 10])
    add(
        "prefix_lm_tensor",
        mods.prefix_lm(torch.tensor(prefix)),
        (3, 2, 10, 10),
        lambda b, h, q, kv: (kv < prefix[b]) | (q >= kv),
    )
    lengths = np.array([5, 0, 9])
    add(
        "key_padding_lengths",
        mods.key_padding(torch.tensor(lengths, dtype=torch.int32)),
        (3, 2, 4, 9),
        lambda b, h, q, kv: kv < lengths[b],
    )
    am = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    for dtype in (torch.bool, torch.int64, torch.float32):
        add(
            f"key_padding_attention_mask_{dtype}",
            mods.key_padding(attention_mask=torch.tensor(am).to(dtype)),
            (2, 1, 3, 7),
            lambda b, h, q, kv: am[b, kv] != 0,
        )
    return cases


MASK_CASES = _mask_cases()


@pytest.mark.parametrize("name,mod,expected", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_mask_mod_matches_dense(name, mod, expected):
    check_mask(mod, expected)


def test_masks_on_int32_tiles_match_int64():
    """Kernels feed int32 index tiles; the mods must not care."""
    for name, mod, expected in MASK_CASES:
        B, H, L, S = expected.shape
        tiles = (
            torch.arange(B, dtype=torch.int32).view(-1, 1, 1, 1),
            torch.arange(H, dtype=torch.int32).view(1, -1, 1, 1),
            torch.arange(L, dtype=torch.int32).view(1, 1, -1, 1),
            torch.arange(S, dtype=torch.int32).view(1, 1, 1, -1),
        )
        out = mod(*tiles).expand(B, H, L, S)
        assert torch.equal(out, torch.from_numpy(np.array(expected, dtype=bool))), name


def test_sliding_window_matches_transformers_convention():
    from transformers import masking_utils as mu

    for w in (1, 3, 7):
        theirs = torch_create_mask(mu.sliding_window_causal_mask_function(w), 1, 1, 16, 16, "cpu")
        ours, _ = masks_both_ways(mods.sliding_window(w), 1, 1, 16, 16)
        assert torch.equal(ours, theirs)


def test_chunked_matches_transformers_convention():
    from transformers import masking_utils as mu

    try:
        fn = mu.chunked_causal_mask_function(5, torch.zeros(1, dtype=torch.long))
    except TypeError:  # older signature without left padding
        fn = mu.chunked_causal_mask_function(5)
    theirs = torch_create_mask(fn, 1, 1, 16, 16, "cpu")
    ours, _ = masks_both_ways(mods.chunked(5), 1, 1, 16, 16)
    assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------------------------
# document id helpers
# --------------------------------------------------------------------------------------------
def test_document_ids_from_offsets():
    got = mods.document_ids_from_offsets(torch.tensor([0, 3, 3, 7, 9]), 11)
    assert got.dtype == torch.long
    assert got.tolist() == [0, 0, 0, 2, 2, 2, 2, 3, 3, -1, -1]
    # a list works too, int32 offsets work, exact cover gives no padding
    assert mods.document_ids_from_offsets([0, 2, 5], 5).tolist() == [0, 0, 1, 1, 1]
    off32 = torch.tensor([0, 1, 4], dtype=torch.int32)
    assert mods.document_ids_from_offsets(off32, 6).tolist() == [0, 1, 1, 1, -1, -1]
    assert mods.document_ids_from_offsets([0], 3).tolist() == [-1, -1, -1]
    # explicit loop reference on a random ragged split
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(0, 6, (9,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lens, 0)])
    total = int(offsets[-1]) + 4
    ref = [-1] * total
    for d in range(len(lens)):
        for t in range(int(offsets[d]), int(offsets[d + 1])):
            ref[t] = d
    assert mods.document_ids_from_offsets(offsets, total).tolist() == ref


def test_document_ids_from_position_ids():
    pid = torch.tensor([0, 1, 2, 0, 1, 5, 6, 0, 0, 1])
    assert mods.document_ids_from_position_ids(pid).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 4, 4]
    # a row that does not start at 0 (continuation) is still one document
    pid2 = torch.tensor([[3, 4, 5, 0, 1, 2], [0, 1, 0, 1, 2, 3]], dtype=torch.int32)
    got = mods.document_ids_from_position_ids(pid2)
    assert got.dtype == torch.long and got.shape == (2, 6)
    assert got.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert mods.document_ids_from_position_ids(torch.tensor([7])).tolist() == [0]


# --------------------------------------------------------------------------------------------
# score mods
# --------------------------------------------------------------------------------------------
def _score_cases() -> list[tuple[str, object, tuple[int, int, int, int], object, bool]]:
    """(name, mod, shape, reference(score, b, h, q, kv) in float64 numpy, exact)."""
    cases = []
    slopes64 = np.array([0.5, 0.125, -0.3])
    cases.append(
        (
            "alibi_f64",
            mods.alibi(torch.tensor(slopes64)),
            (2, 3, 7, 10),
            lambda s, b, h, q, kv: s + slopes64[h] * (kv - q),
            True,
        )
    )
    slopes32 = mods.alibi_slopes_bloom(5).numpy()
    cases.append(
        (
            "alibi_f32_slopes",
            mods.alibi(torch.from_numpy(slopes32)),
            (1, 5, 9, 9),
            # the bias is a float32 product (slopes' dtype), then added in float64
            lambda s, b, h, q, kv: (
                s + (slopes32[h] * (kv - q).astype(np.float32)).astype(np.float64)
            ),
            True,
        )
    )
    for cap in (0.5, 5.0, 30.0):
        cases.append(
            (
                f"softcap_{cap}",
                mods.softcap(cap),
                (1, 2, 6, 8),
                lambda s, b, h, q, kv, cap=cap: cap * np.tanh(s / cap),
                False,
            )
        )
    R = 3
    table = np.random.default_rng(0).standard_normal((2, 2 * R + 1))
    cases.append(
        (
            "relative_position_bias_2d",
            mods.relative_position_bias(torch.tensor(table), R),
            (2, 2, 9, 12),
            lambda s, b, h, q, kv: s + table[h, np.clip(kv - q, -R, R) + R],
            True,
        )
    )
    cases.append(
        (
            "relative_position_bias_1d",
            mods.relative_position_bias(torch.tensor(table[1]), R),
            (1, 3, 9, 12),
            lambda s, b, h, q, kv: s + table[1][np.clip(kv - q, -R, R) + R],
            True,
        )
    )
    cases.append(
        (
            "relative_position_bias_R0",
            mods.relative_position_bias(torch.tensor(table[:, :1]), 0),
            (1, 2, 4, 5),
            lambda s, b, h, q, kv: s + table[h, 0 * q + 0 * kv],
            True,
        )
    )
    cases.append(
        (
            "compose_alibi_relbias_softcap",
            mods.compose_score_mods(
                mods.alibi(torch.tensor(slopes64[:2])),
                mods.relative_position_bias(torch.tensor(table), R),
                mods.softcap(4.0),
            ),
            (1, 2, 8, 8),
            lambda s, b, h, q, kv: (
                4.0
                * np.tanh((s + slopes64[h] * (kv - q) + table[h, np.clip(kv - q, -R, R) + R]) / 4.0)
            ),
            False,
        )
    )
    cases.append(("compose_empty", mods.compose_score_mods(), (1, 1, 3, 4), lambda s, *a: s, True))
    return cases


SCORE_CASES = _score_cases()


@pytest.mark.parametrize("name,mod,shape,ref,exact", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_score_mod_matches_dense(name, mod, shape, ref, exact):
    g = torch.Generator().manual_seed(1)
    score = 4 * torch.randn(shape, dtype=torch.float64, generator=g)
    expected = ref(score.numpy(), *np_grid(*shape))
    expected = torch.from_numpy(np.array(np.broadcast_to(expected, shape)))
    B, H, L, S = shape
    ours = eval_score_mod(mod, score, idx(B), idx(H), idx(L), idx(S))
    theirs = torch_vmap_score(mod, score)
    for got in (ours, theirs):
        assert got.dtype == torch.float64 and got.shape == shape
        if exact:
            assert torch.equal(got, expected)
        else:  # tanh: numpy's and torch's float64 tanh may differ by an ulp
            torch.testing.assert_close(got, expected, rtol=4e-16, atol=4e-16)
    assert_broadcast_safe(mod, True, shape)


def _rel_bias_grad_ref(w: np.ndarray, R: int, shared: bool) -> np.ndarray:
    B, H, L, S = w.shape
    g = np.zeros((2 * R + 1,) if shared else (H, 2 * R + 1))
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    r = min(max(j - i, -R), R) + R
                    if shared:
                        g[r] += w[b, h, i, j]
                    else:
                        g[h, r] += w[b, h, i, j]
    return g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("path", ["ours", "torch_vmap"])
def test_relative_position_bias_gradient_reaches_table(dtype, shared, path):
    R, B, H, L, S = 2, 2, 3, 7, 9
    gen = torch.Generator().manual_seed(2)
    init = torch.randn((2 * R + 1,) if shared else (H, 2 * R + 1), generator=gen)
    table = torch.nn.Parameter(init.to(dtype))
    mod = mods.relative_position_bias(table, R)
    score = torch.randn(B, H, L, S, dtype=dtype, generator=None).requires_grad_(True)
    # integer-valued weights: every gradient sum is exact whatever the summation order
    w = torch.randint(-5, 6, (B, H, L, S), generator=gen).to(dtype)
    if path == "ours":
        out = eval_score_mod(mod, score, idx(B), idx(H), idx(L), idx(S))
    else:
        out = torch_vmap_score(mod, score)
    (out * w).sum().backward()
    expected = torch.from_numpy(_rel_bias_grad_ref(w.double().numpy(), R, shared)).to(dtype)
    assert table.grad is not None and table.grad.dtype == dtype
    assert torch.equal(table.grad, expected)
    assert torch.equal(score.grad, w)


def test_alibi_and_softcap_gradients_wrt_score():
    B, H, L, S = 1, 2, 5, 6
    slopes = torch.tensor([0.25, 0.5], dtype=torch.float64)
    mod = mods.compose_score_mods(mods.alibi(slopes), mods.softcap(3.0))
    score = torch.randn(B, H, L, S, dtype=torch.float64).requires_grad_(True)
    out = eval_score_mod(mod, score, idx(B), idx(H), idx(L), idx(S))
    out.sum().backward()
    _, _, q, kv = np_grid(B, H, L, S)
    x = (score.detach().numpy() + slopes.numpy()[None, :, None, None] * (kv - q)) / 3.0
    expected = torch.from_numpy(1.0 - np.tanh(x) ** 2)
    torch.testing.assert_close(score.grad, expected, rtol=1e-15, atol=1e-15)


# --------------------------------------------------------------------------------------------
# ALiBi slopes vs Transformers
# --------------------------------------------------------------------------------------------
def _bloom_reference(n: int) -> torch.Tensor:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n, torch.float32)
    return alibi.reshape(n, 2)[:, 1]  # key position 1: slope * 1


def _falcon_reference(n: int) -> torch.Tensor:
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n, torch.float32)
    return alibi.reshape(n, 2)[:, 1]


def _mpt_reference(n: int, bias_max: int = 8) -> torch.Tensor:
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    alibi = build_mpt_alibi_tensor(n, 2, bias_max)  # [H, 1, 2]: positions -1, 0
    return -alibi.reshape(n, 2)[:, 0]


def test_alibi_slopes_match_transformers_exactly():
    for n in HEAD_COUNTS:
        bloom = mods.alibi_slopes_bloom(n)
        assert bloom.dtype == torch.float32 and bloom.shape == (n,)
        assert torch.equal(bloom, _bloom_reference(n)), f"bloom, {n} heads"
        falcon = mods.alibi_slopes_falcon(n)
        assert falcon.dtype == torch.float32
        assert torch.equal(falcon, _falcon_reference(n)), f"falcon, {n} heads"
        mpt = mods.alibi_slopes_mpt(n)
        assert mpt.dtype == torch.float32 and mpt.shape == (n,)
        assert torch.equal(mpt, _mpt_reference(n)), f"mpt, {n} heads"
    for bias_max in (4, 16):
        for n in (3, 8, 12, 40):
            assert torch.equal(mods.alibi_slopes_mpt(n, bias_max), _mpt_reference(n, bias_max))


def test_alibi_slopes_known_values():
    # power-of-two head counts: both formulas give 2**-(8k/H).  Bloom raises a float32-rounded
    # base to the k-th power, so its relative error grows to about k * 2**-24.
    for n in (1, 2, 4, 8, 16):
        expected = torch.tensor([2.0 ** (-8.0 * k / n) for k in range(1, n + 1)])
        rtol = n * 2.0**-24
        torch.testing.assert_close(mods.alibi_slopes_bloom(n), expected, rtol=rtol, atol=0)
        torch.testing.assert_close(mods.alibi_slopes_mpt(n), expected, rtol=2e-7, atol=0)
    # 12 heads: Bloom = 8 slopes of base 2**-1, then odd powers of base 2**-0.5
    bloom12 = [2.0**-k for k in range(1, 9)] + [2.0 ** (-0.5 * k) for k in (1, 3, 5, 7)]
    torch.testing.assert_close(
        mods.alibi_slopes_bloom(12), torch.tensor(bloom12), rtol=2e-7, atol=0
    )
    # MPT 12 heads: 16 candidates 2**-(k/2); odd-positioned (k even) first, then k odd, cut to 12
    cand = [2.0 ** (-k / 2) for k in range(1, 17)]
    mpt12 = (cand[1::2] + cand[0::2])[:12]
    torch.testing.assert_close(mods.alibi_slopes_mpt(12), torch.tensor(mpt12), rtol=2e-7, atol=0)


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------
def test_names():
    ids = torch.tensor([0, 0, 1])
    t = torch.zeros(2, 5)
    expected = {
        "causal_mask": mods.causal_mask,
        "causal": mods.causal(),
        "causal_offset_5": mods.causal(5),
        "sliding_window_128": mods.sliding_window(128),
        "sliding_window_4_offset_3": mods.sliding_window(4, offset=3),
        "bidirectional_window_16": mods.sliding_window(16, causal=False),
        "chunked_8": mods.chunked(8),
        "bidirectional_chunked_8": mods.chunked(8, causal=False),
        "document": mods.document_mask(ids),
        "causal_document": mods.document_mask(ids, causal=True),
        "prefix_lm": mods.prefix_lm(3),
        "key_padding": mods.key_padding(torch.tensor([2])),
        "alibi": mods.alibi(torch.ones(2)),
        "softcap_30": mods.softcap(30.0),
        "softcap_2.5": mods.softcap(2.5),
        "relative_position_bias": mods.relative_position_bias(t, 2),
    }
    for name, fn in expected.items():
        assert fn.__name__ == name
    assert mods.documents_from_offsets([0, 2], 2).__name__ == "causal_document"
    assert mods.documents_from_position_ids(ids, causal=False).__name__ == "document"
    assert mods.key_padding(attention_mask=torch.ones(1, 3)).__name__ == "key_padding"
    comp = mods.compose_score_mods(mods.alibi(torch.ones(2)), mods.softcap(30.0))
    assert comp.__name__ == "compose(alibi,softcap_30)"


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def _score4(score, b, h, q_idx):  # wrong arity for a score_mod
    return score


BAD_INPUTS = [
    ("causal_float", lambda: mods.causal(1.5), TypeError, "offset"),
    ("window_0", lambda: mods.sliding_window(0), ValueError, "window"),
    ("window_neg", lambda: mods.sliding_window(-3), ValueError, "window"),
    ("window_float", lambda: mods.sliding_window(4.0), TypeError, "window"),
    ("window_bool", lambda: mods.sliding_window(True), TypeError, "window"),
    ("window_causal_str", lambda: mods.sliding_window(4, causal="yes"), TypeError, "causal"),
    ("window_offset_float", lambda: mods.sliding_window(4, offset=0.5), TypeError, "offset"),
    ("chunk_0", lambda: mods.chunked(0), ValueError, "chunk_size"),
    ("chunk_neg", lambda: mods.chunked(-8), ValueError, "chunk_size"),
    ("cap_0", lambda: mods.softcap(0.0), ValueError, "cap"),
    ("cap_neg", lambda: mods.softcap(-1.0), ValueError, "cap"),
    ("cap_inf", lambda: mods.softcap(math.inf), ValueError, "cap"),
    ("cap_nan", lambda: mods.softcap(math.nan), ValueError, "cap"),
    ("cap_tensor", lambda: mods.softcap(torch.tensor(2.0)), TypeError, "cap"),
    ("doc_float", lambda: mods.document_mask(torch.zeros(4)), TypeError, "document_ids"),
    ("doc_bool", lambda: mods.document_mask(torch.ones(4, dtype=torch.bool)), TypeError, "dtype"),
    (
        "doc_3d",
        lambda: mods.document_mask(torch.zeros(1, 1, 4, dtype=torch.long)),
        ValueError,
        "document_ids",
    ),
    ("doc_0d", lambda: mods.document_mask(torch.tensor(0)), ValueError, "document_ids"),
    ("doc_list", lambda: mods.document_mask([0, 0, 1]), TypeError, "document_ids"),
    ("off_start", lambda: mods.document_ids_from_offsets([1, 3], 4), ValueError, "start at 0"),
    (
        "off_decreasing",
        lambda: mods.document_ids_from_offsets([0, 3, 2], 4),
        ValueError,
        "non-decreasing",
    ),
    ("off_too_long", lambda: mods.document_ids_from_offsets([0, 3, 6], 4), ValueError, "total_len"),
    (
        "off_2d",
        lambda: mods.document_ids_from_offsets(torch.zeros(1, 2, dtype=torch.long), 4),
        ValueError,
        "offsets",
    ),
    (
        "off_float",
        lambda: mods.document_ids_from_offsets(torch.tensor([0.0, 2.0]), 4),
        TypeError,
        "offsets",
    ),
    ("off_empty", lambda: mods.document_ids_from_offsets([], 4), ValueError, "offsets"),
    ("off_total_neg", lambda: mods.document_ids_from_offsets([0], -1), ValueError, "total_len"),
    (
        "pid_3d",
        lambda: mods.document_ids_from_position_ids(torch.zeros(1, 1, 3, dtype=torch.long)),
        ValueError,
        "position_ids",
    ),
    (
        "pid_float",
        lambda: mods.document_ids_from_position_ids(torch.zeros(3)),
        TypeError,
        "position_ids",
    ),
    ("prefix_neg", lambda: mods.prefix_lm(-1), ValueError, "prefix_lengths"),
    (
        "prefix_2d",
        lambda: mods.prefix_lm(torch.zeros(2, 2, dtype=torch.long)),
        ValueError,
        "prefix_lengths",
    ),
    ("prefix_float", lambda: mods.prefix_lm(torch.zeros(2)), TypeError, "prefix_lengths"),
    ("prefix_0d", lambda: mods.prefix_lm(torch.tensor(3)), ValueError, "prefix_lengths"),
    (
        "pad_both",
        lambda: mods.key_padding(torch.tensor([2]), attention_mask=torch.ones(1, 3)),
        ValueError,
        "both",
    ),
    ("pad_neither", lambda: mods.key_padding(), ValueError, "neither"),
    (
        "pad_lengths_2d",
        lambda: mods.key_padding(torch.zeros(1, 2, dtype=torch.long)),
        ValueError,
        "lengths",
    ),
    ("pad_lengths_float", lambda: mods.key_padding(torch.tensor([2.0])), TypeError, "lengths"),
    (
        "pad_am_1d",
        lambda: mods.key_padding(attention_mask=torch.ones(3)),
        ValueError,
        "attention_mask",
    ),
    ("alibi_2d", lambda: mods.alibi(torch.ones(2, 2)), ValueError, "slopes"),
    ("alibi_int", lambda: mods.alibi(torch.ones(2, dtype=torch.long)), TypeError, "slopes"),
    ("alibi_list", lambda: mods.alibi([0.5, 0.25]), TypeError, "slopes"),
    ("rel_3d", lambda: mods.relative_position_bias(torch.zeros(1, 2, 5), 2), ValueError, "table"),
    ("rel_width", lambda: mods.relative_position_bias(torch.zeros(2, 4), 2), ValueError, "table"),
    (
        "rel_int",
        lambda: mods.relative_position_bias(torch.zeros(2, 5, dtype=torch.long), 2),
        TypeError,
        "table",
    ),
    (
        "rel_R_neg",
        lambda: mods.relative_position_bias(torch.zeros(2, 5), -2),
        ValueError,
        "max_distance",
    ),
    (
        "compose_not_callable",
        lambda: mods.compose_score_mods(mods.softcap(2.0), 3),
        TypeError,
        "mods[1]",
    ),
    ("compose_arity", lambda: mods.compose_score_mods(_score4), TypeError, "mods[0]"),
    ("bloom_0", lambda: mods.alibi_slopes_bloom(0), ValueError, "num_heads"),
    ("bloom_float", lambda: mods.alibi_slopes_bloom(8.0), TypeError, "num_heads"),
    ("mpt_0", lambda: mods.alibi_slopes_mpt(0), ValueError, "num_heads"),
    ("mpt_bias_max", lambda: mods.alibi_slopes_mpt(8, 0), ValueError, "alibi_bias_max"),
    ("falcon_neg", lambda: mods.alibi_slopes_falcon(-4), ValueError, "num_heads"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match.replace("[", r"\[").replace("]", r"\]")):
        call()


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------
def test_render_mask():
    assert mods.render_mask(mods.causal_mask, 3, 4) == "█...\n██..\n███."
    pl = mods.prefix_lm(torch.tensor([0, 3]))
    assert mods.render_mask(pl, 3, 4, b=1) == "███.\n███.\n███."


def test_main_draws_every_mask(capsys):
    assert mods.main() == 0
    out = capsys.readouterr().out
    for name in (
        "causal_mask",
        "sliding_window_6",
        "bidirectional_window_6",
        "chunked_8",
        "causal_document",
        "prefix_lm",
        "key_padding",
        "causal_offset_20",
    ):
        assert f"[{name}]" in out
    rows = [line for line in out.splitlines() if line and set(line) <= {"█", "."}]
    assert len(rows) >= 24 * 10
    assert all(len(r) == 24 for r in rows)
