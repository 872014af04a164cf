"""The blockwise PyTorch backend against the float64 dense reference on the shared zoo."""

from __future__ import annotations

import warnings

import pytest
import torch
from reference import assert_close_by_ratio, default_floor, reference_attention
from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from zoo import ZOO, ZOO_BY_NAME, ZooCase, make_block_mask, make_inputs

from hf_flexattn.backends.torch_backend import flex_attention_forward

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _scale(case: ZooCase) -> float:
    return case.scale if case.scale is not None else case.E**-0.5


def _loss(
    out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor, d_lse: torch.Tensor
) -> torch.Tensor:
    """A loss that reaches out and (finite) lse, so both backward paths are exercised."""
    lse_fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out.to(d_out.dtype) * d_out).sum() + (lse_fin.to(d_lse.dtype) * d_lse).sum()


def _run_case(case: ZooCase, dtype: torch.dtype, kernel_options: dict | None = None) -> None:
    score_mod, mask_mod, params = case.build(torch.device("cpu"))
    q, k, v = make_inputs(case, dtype, requires_grad=True)
    block_mask = make_block_mask(case, mask_mod)
    scale = _scale(case)
    g = torch.Generator().manual_seed(1)
    d_out = torch.randn(case.B, case.Hq, case.L, case.Ev, generator=g, dtype=torch.float64)
    d_lse = 0.5 * torch.randn(case.B, case.Hq, case.L, generator=g, dtype=torch.float64)
    # upstream grads exactly representable in dtype: autograd rounds them to the output's
    # dtype on the way in, so the float64 reference must see the same values
    d_out, d_lse = d_out.to(dtype).double(), d_lse.to(dtype).double()

    out, lse = flex_attention_forward(q, k, v, score_mod, block_mask, scale, kernel_options or {})
    assert out.dtype == dtype and out.shape == (case.B, case.Hq, case.L, case.Ev)
    assert lse.dtype == torch.float32 and lse.shape == (case.B, case.Hq, case.L)
    grads = torch.autograd.grad(_loss(out, lse, d_out, d_lse), [q, k, v, *params])

    def dense(compute_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        leaves = [
            t.detach()
            .to(compute_dtype if compute_dtype == torch.float64 else dtype)
            .requires_grad_(True)
            for t in (q, k, v)
        ]
        o, l = reference_attention(
            *leaves,
            score_mod=score_mod,
            mask_mod=mask_mod,
            scale=scale,
            enable_gqa=case.gqa,
            compute_dtype=compute_dtype,
        )
        gr = torch.autograd.grad(
            _loss(o, l, d_out.to(compute_dtype), d_lse.to(compute_dtype)),
            [*leaves, *params],
            allow_unused=True,
        )
        gr = [torch.zeros_like(p) if x is None else x for x, p in zip(gr, [*leaves, *params])]
        return (o, l, *gr)

    ref = dense(torch.float64)
    base = dense(dtype)
    names = ["out", "lse", "dq", "dk", "dv"] + [f"d_param{i}" for i in range(len(params))]
    for name, a, r, b in zip(names, (out, lse, *grads), ref, base):
        # the floor follows the compute dtype (captured fp32 params get fp16/bf16 math)
        assert_close_by_ratio(a, r, b, f"{case.name}[{dtype}] {name}", floor=default_floor(dtype))
        assert a.dtype == (torch.float32 if name == "lse" else b.dtype), name


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_zoo_matches_reference(case: ZooCase, dtype: torch.dtype) -> None:
    _run_case(case, dtype)


@pytest.mark.parametrize(
    "name", ["document_causal", "intervals_row_index", "decode_16_gqa3", "rel_bias_learnable"]
)
def test_small_chunks_and_gathered_columns(name: str) -> None:
    # one kv block per chunk: many chunks, non-contiguous gathers, index_add_ in backward
    _run_case(ZOO_BY_NAME[name], torch.float32, {"chunk_columns": 16})


def _dense_from_blocks(
    bm: TorchBlockMask, mask_mod, B: int, H: int, L: int, S: int
) -> torch.Tensor:
    """What a BlockMask means: full -> allowed, partial -> mask_mod, empty -> masked."""
    qb, kb = bm.BLOCK_SIZE
    state = torch.zeros(
        bm.kv_num_blocks.shape[0],
        bm.kv_num_blocks.shape[1],
        -(-L // qb),
        -(-S // kb),
        dtype=torch.int8,
    )
    for num, idx, val in (
        (bm.kv_num_blocks, bm.kv_indices, 1),
        (bm.full_kv_num_blocks, bm.full_kv_indices, 2),
    ):
        if num is None:
            continue
        for b in range(num.shape[0]):
            for h in range(num.shape[1]):
                for i in range(state.shape[2]):
                    for j in idx[b, h, i, : num[b, h, i]].tolist():
                        state[b, h, i, j] = val
    st = state.repeat_interleave(qb, 2).repeat_interleave(kb, 3)[:, :, :L, :S]
    mm = mask_mod(
        torch.arange(B).view(-1, 1, 1, 1),
        torch.arange(H).view(1, -1, 1, 1),
        torch.arange(L).view(1, 1, -1, 1),
        torch.arange(S).view(1, 1, 1, -1),
    )
    return (st == 2) | ((st == 1) & mm)


def _kv_blocks(rows: list[list[int]], n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index lists in torch's order: listed blocks first, then the rest ascending."""
    num = torch.tensor([[[len(r) for r in rows]]], dtype=torch.int32)
    idx = torch.tensor(
        [[[r + [j for j in range(n_kv) if j not in r] for r in rows]]], dtype=torch.int32
    )
    return num, idx


def test_block_mask_is_authoritative_and_empty_tiles_skipped() -> None:
    """Tiles the BlockMask leaves out are never evaluated; full tiles never call mask_mod."""
    L, S, QB, KB = 40, 50, 16, 16  # 3 q-blocks, 4 kv-blocks (ragged both ways)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording_causal(b, h, q_idx, kv_idx):
        seen.append((q_idx, kv_idx))  # plain Python: no torch op, broadcast path stays on
        return q_idx >= kv_idx

    # q-block 1: kv 0 partial although causal makes it full; q-block 2: kv 1 left out
    # although causal allows it (must stay masked); tile (0, 2) claimed full although
    # causal forbids it (must be attended without asking mask_mod)
    partial = [[0], [0, 1], [2]]
    full = [[2], [], [0]]
    num, idx = _kv_blocks(partial, 4)
    fnum, fidx = _kv_blocks(full, 4)
    bm = TorchBlockMask.from_kv_blocks(
        num, idx, fnum, fidx, BLOCK_SIZE=(QB, KB), mask_mod=recording_causal, seq_lengths=(L, S)
    )
    q, k, v = (
        torch.randn(1, 2, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for i, n in enumerate((L, S, S))
    )
    seen.clear()
    out, lse = flex_attention_forward(q, k, v, None, bm, 0.25, {})
    allowed_blocks = {i: set(r) for i, r in enumerate(partial)}
    assert seen, "mask_mod was never called on partial tiles"
    for q_idx, kv_idx in seen:
        qs, kvs = q_idx.flatten().tolist(), kv_idx.flatten().tolist()
        blocks_q = {x // QB for x in qs}
        assert len(blocks_q) == 1
        i = blocks_q.pop()
        assert {x // KB for x in kvs} <= allowed_blocks[i], (i, kvs)
        assert max(qs) < L and max(kvs) < S
    dense = _dense_from_blocks(bm, lambda b, h, qi, kv: qi >= kv, 1, 2, L, S)
    ro, rl = reference_attention(
        q, k, v, mask_mod=lambda b, h, qi, kv: dense[0, 0, qi, kv], scale=0.25
    )
    torch.testing.assert_close(out, ro, rtol=1e-12, atol=1e-12)
    assert lse.dtype == torch.float64  # fp64 inputs keep an fp64 lse, as in torch
    torch.testing.assert_close(lse, rl, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(lse).all()
    causal_out, _ = reference_attention(q, k, v, mask_mod=lambda b, h, qi, kv: qi >= kv, scale=0.25)
    assert (out - causal_out).abs().amax(-1)[0, 0, :16].min() > 1e-3  # claimed-full tile
    assert (out - causal_out).abs().amax(-1)[0, 0, 32:].min() > 1e-3  # left-out tile


def test_full_only_mask_never_calls_mask_mod_and_no_full_lists() -> None:
    calls = []

    def boom(b, h, q_idx, kv_idx):
        calls.append(1)
        raise AssertionError("mask_mod must not run on full tiles")

    L, S = 33, 47
    nq, nkv = 3, 3
    zeros = torch.zeros(1, 1, nq, dtype=torch.int32)
    idx = torch.arange(nkv, dtype=torch.int32).expand(1, 1, nq, nkv).contiguous()
    full = torch.full((1, 1, nq), nkv, dtype=torch.int32)
    bm = TorchBlockMask.from_kv_blocks(
        zeros, idx, full, idx.clone(), BLOCK_SIZE=(16, 16), mask_mod=boom, seq_lengths=(L, S)
    )
    q, k, v = make_inputs(
        ZooCase("x", lambda d: (None, None, []), L=L, S=S), torch.float64, requires_grad=True
    )
    out, lse = flex_attention_forward(q, k, v, None, bm, 0.25, {})
    out.sum().backward()
    assert not calls
    ro, rl = reference_attention(q.detach(), k.detach(), v.detach(), scale=0.25)
    torch.testing.assert_close(out, ro, rtol=1e-12, atol=1e-12)

    # the same mask as partial tiles only (full_kv_* = None): mask_mod decides everything
    bm2 = TorchBlockMask.from_kv_blocks(
        full,
        idx.clone(),
        BLOCK_SIZE=(16, 16),
        mask_mod=lambda b, h, qi, kv: (qi + kv) % 3 != 0,
        seq_lengths=(L, S),
    )
    out2, _ = flex_attention_forward(q.detach(), k.detach(), v.detach(), None, bm2, 0.25, {})
    ro2, _ = reference_attention(
        q.detach(),
        k.detach(),
        v.detach(),
        mask_mod=lambda b, h, qi, kv: (qi + kv) % 3 != 0,
        scale=0.25,
    )
    torch.testing.assert_close(out2, ro2, rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_zero_out_and_grads_no_nan() -> None:
    case = ZOO_BY_NAME["rows_see_nothing"]
    score_mod, mask_mod, _ = case.build(torch.device("cpu"))

    def nan_mod(score, b, h, q_idx, kv_idx):  # NaN (value and derivative) above the diagonal
        return score * torch.sqrt((q_idx - kv_idx).float() + 0.5)

    q, k, v = make_inputs(case, torch.float32, requires_grad=True)
    bm = make_block_mask(case, mask_mod)
    out, lse = flex_attention_forward(q, k, v, nan_mod, bm, 0.25, {})
    empty = torch.tensor([(r // 16 == 1) or (r % 7 == 3) for r in range(case.L)])
    assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, ~empty]).all()
    assert (out[:, :, empty] == 0).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, empty] == 0).all()


def test_no_grad_and_captured_only_grad() -> None:
    case = ZOO_BY_NAME["rel_bias_learnable"]
    score_mod, mask_mod, params = case.build(torch.device("cpu"))
    q, k, v = make_inputs(case, torch.float64)  # no grad on q, k, v
    bm = make_block_mask(case, mask_mod)
    out, lse = flex_attention_forward(q, k, v, score_mod, bm, 0.25, {})
    assert lse.dtype == torch.float64 and out.requires_grad
    out.pow(2).sum().backward()
    ro, _ = reference_attention(q, k, v, score_mod, mask_mod, scale=0.25)
    (g_ref,) = torch.autograd.grad(ro.pow(2).sum(), params)
    torch.testing.assert_close(params[0].grad, g_ref.to(params[0].dtype), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out2, _ = flex_attention_forward(q, k, v, score_mod, bm, 0.25, {})
    assert not out2.requires_grad
    torch.testing.assert_close(out2, out.detach(), rtol=0, atol=0)


def test_strided_inputs_and_per_batch_head_mask() -> None:
    # q/k/v as transposed views of [B, L, H, D] storage; mask with per-(b, h) block lists
    B, H, L, S, E = 2, 3, 45, 45, 32
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, L, H, E, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, S, H, E, generator=g, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(B, S, H, E, generator=g, dtype=torch.float64).transpose(1, 2)
    for t in (q, k, v):
        t.requires_grad_(True)
    lengths = torch.tensor([20, 45])

    def mm(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & (q_idx - kv_idx <= 8 * (h + 1)) & (q_idx >= kv_idx)

    bm = torch_create_block_mask(mm, B, H, L, S, device="cpu", BLOCK_SIZE=(16, 16))
    out, lse = flex_attention_forward(q, k, v, None, bm, 0.2, {})
    ro, rl = reference_attention(q, k, v, mask_mod=mm, scale=0.2)
    torch.testing.assert_close(out, ro, rtol=1e-12, atol=1e-12)
    gq = torch.autograd.grad(out.sum(), q)[0]
    gq_ref = torch.autograd.grad(ro.sum(), q)[0]
    torch.testing.assert_close(gq, gq_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "name",
    [
        "causal",
        "document_causal",
        "alibi_causal",
        "softcap_causal",
        "decode_16_gqa3",
        "bit_ops_floordiv_mod",
        "ragged_cross_37x300",
    ],
)
def test_forward_matches_torch_flex_attention_eager(name: str) -> None:
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    case = ZOO_BY_NAME[name]
    score_mod, mask_mod, _ = case.build(torch.device("cpu"))
    q, k, v = make_inputs(case, torch.float32)
    bm = make_block_mask(case, mask_mod)
    tbm = torch_create_block_mask(
        mask_mod or (lambda b, h, qi, kv: qi >= 0),
        case.B if case.mask_b else None,
        case.Hq if case.mask_h else None,
        case.L,
        case.S,
        device="cpu",
        BLOCK_SIZE=case.block_size,
    )
    scale = _scale(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_out, t_lse = torch_flex(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=tbm,
            scale=scale,
            enable_gqa=case.gqa,
            return_lse=True,
        )
    out, lse = flex_attention_forward(q, k, v, score_mod, bm, scale, {})
    torch.testing.assert_close(out, t_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, t_lse.float(), rtol=2e-5, atol=2e-5)


def test_large_causal_is_fast_enough() -> None:
    import time

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1024, 64, generator=g).requires_grad_(True) for _ in range(3))
    bm = torch_create_block_mask(
        lambda b, h, qi, kv: qi >= kv, None, None, 1024, 1024, device="cpu"
    )
    t0 = time.perf_counter()
    out, _ = flex_attention_forward(q, k, v, None, bm, 0.125, {})
    out.sum().backward()
    # ~0.2 s on an idle 2-core box; the bound only catches pathological slow-downs
    assert time.perf_counter() - t0 < 20.0
