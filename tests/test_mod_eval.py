"""The mod evaluator: torch's vmap semantics, broadcast fast path, captured tensors."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from hf_flexattn._mod_eval import (
    _NEEDS_VMAP,
    check_mod_arity,
    eval_mask_mod,
    eval_score_mod,
    find_captured_tensors,
)

ar = torch.arange
g = torch.Generator().manual_seed(0)
intervals = torch.tensor([[0, 5], [5, 9], [9, 16]])
image_id = torch.randint(0, 3, (16,), generator=g)
doc = torch.tensor([0] * 5 + [1] * 6 + [2] * 5)
offsets = torch.tensor([0, 5, 11, 16])
lengths = torch.tensor([16, 9])


def interval_mask(b, h, q, kv):  # partial indexing: a row, then its elements
    row = intervals[image_id[kv]]
    return (q >= row[0]) & (q < row[1])


def nested_offsets(b, h, q, kv):
    return (kv >= offsets[doc[q]]) & (kv <= q)


def bits(b, h, q, kv):
    return ((q ^ kv) & 3) == ((q >> 1) % 4) | ((kv << 1) // 3 == h)


def per_batch(b, h, q, kv):
    return (kv < lengths[b]) & (q >= kv)


def shape_reader(b, h, q, kv):  # reads .shape: only correct under vmap
    return q >= kv + q.shape.numel() - 1


MASKS = [interval_mask, nested_offsets, bits, per_batch, shape_reader]


@pytest.mark.parametrize("mod", MASKS, ids=lambda m: m.__name__)
def test_mask_matches_torch_create_mask(mod):
    ours = eval_mask_mod(mod, ar(2), ar(3), ar(16), ar(16))
    ref = create_mask(mod, 2, 3, 16, 16, device="cpu")
    assert ours.dtype == torch.bool and torch.equal(ours, ref)


def test_broadcast_path_taken_only_when_safe():
    for mod in (nested_offsets, bits, per_batch):
        eval_mask_mod(mod, ar(2), ar(3), ar(16), ar(16))
        assert mod.__code__ not in _NEEDS_VMAP, mod.__name__
    eval_mask_mod(interval_mask, ar(1), ar(1), ar(16), ar(16))
    assert interval_mask.__code__ in _NEEDS_VMAP


def test_broadcast_attempt_stops_at_the_first_unsafe_op():
    # partial indexing, then an index that is out of range under broadcasting (rows of
    # length 1): that index must never run (on CUDA it is a device-side assert, not an error)
    table = torch.randn(3, 5, dtype=torch.float64)
    seen = []

    def row_bias(score, b, h, q, kv):
        row = table[h]
        seen.append(tuple(row.shape))
        return score + row[(q - kv) % 5]

    s = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    out = eval_score_mod(row_bias, s, ar(1), ar(3), ar(6), ar(6))
    assert seen == [(5,)]  # only vmap's evaluation got past `table[h]`
    rel = (ar(6)[:, None] - ar(6)[None, :]) % 5
    torch.testing.assert_close(out, s + table[:, rel][None])


def test_score_mod_values_and_grad():
    table = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)

    def rel(score, b, h, q, kv):
        return score + table[h, (q - kv).clamp(-4, 4) + 4]

    s = torch.randn(2, 3, 7, 11, dtype=torch.float64)
    out = eval_score_mod(rel, s, ar(2), ar(3), ar(7), ar(11))
    d = (ar(7)[:, None] - ar(11)[None, :]).clamp(-4, 4) + 4
    ref = s + table[:, d][None]
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(s)
    (gt,) = torch.autograd.grad((out * w).sum(), table)
    (gr,) = torch.autograd.grad((ref * w).sum(), table)
    torch.testing.assert_close(gt, gr)


def test_wrong_return_types():
    with pytest.raises(TypeError, match="mask_mod must return a bool"):
        eval_mask_mod(lambda b, h, q, kv: q - kv, ar(1), ar(1), ar(4), ar(4))
    with pytest.raises(TypeError, match="score_mod must return a floating-point"):
        eval_score_mod(
            lambda s, b, h, q, kv: q, torch.zeros(1, 1, 4, 4), ar(1), ar(1), ar(4), ar(4)
        )
    vec = torch.arange(5)

    def not_scalar(b, h, q, kv):  # returns a vector per element
        return vec > q

    with pytest.raises(ValueError, match="one scalar per"):
        eval_mask_mod(not_scalar, ar(1), ar(1), ar(4), ar(4))


def test_arity_check():
    check_mod_arity(lambda b, h, q, kv: q, 4, "mask_mod")
    check_mod_arity(lambda s, b, h, q, kv, extra=1: s, 5, "score_mod")
    with pytest.raises(TypeError, match="mask_mod must take 4 positional arguments"):
        check_mod_arity(lambda s, b, h, q, kv: s, 4, "mask_mod")
    with pytest.raises(TypeError, match="must be callable"):
        check_mod_arity(None, 4, "mask_mod")


def test_find_captured_tensors():
    w = torch.nn.Parameter(torch.ones(4))

    def mod(score, b, h, q, kv):
        return score * w[h] + doc[q].float() + torch.tensor(1.0)

    found = find_captured_tensors(mod, score=True)
    assert {id(t) for t in found} == {id(w), id(doc)}
    assert (
        find_captured_tensors(interval_mask, score=False)[0] is image_id
        or len(find_captured_tensors(interval_mask, score=False)) == 2
    )
