"""The shared zoo of attention cases that every backend is checked on.

Each :class:`ZooCase` names its shapes and a ``build(device)`` that returns
``(score_mod, mask_mod, params)``: the mods (or None) and the captured tensors that
require grad (learnable biases), created fresh on ``device`` for every call so gradient
tests start from clean ``.grad``. Captured data is deterministic.

Helpers: :func:`make_inputs` (q, k, v), :func:`make_block_mask` (a BlockMask with small
tiles, so small shapes still have empty, partial and full tiles).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

try:  # the mod library; local stand-ins until it exists
    from hf_flexattn import mods as _mods

    _ = (_mods.causal_mask, _mods.sliding_window, _mods.document_mask, _mods.softcap)
except (ImportError, AttributeError):  # pragma: no cover - only while modules are written
    _mods = None

try:
    from hf_flexattn.block_mask import and_masks, or_masks
except ImportError:  # pragma: no cover
    from torch.nn.attention.flex_attention import and_masks, or_masks

__all__ = ["ZooCase", "ZOO", "ZOO_BY_NAME", "make_inputs", "make_block_mask", "mods_lib"]

Mods = tuple[Callable | None, Callable | None, list[torch.Tensor]]


class _LocalMods:
    """Stand-ins with the mod library's names (used only if hf_flexattn.mods is missing)."""

    @staticmethod
    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    @staticmethod
    def causal(offset: int = 0):
        def causal_offset(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        return causal_offset

    @staticmethod
    def sliding_window(window: int):
        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        return sliding

    @staticmethod
    def document_mask(ids: torch.Tensor, causal: bool = True):
        def doc(b, h, q_idx, kv_idx):
            same = ids[q_idx] == ids[kv_idx]
            return same & (q_idx >= kv_idx) if causal else same

        return doc

    @staticmethod
    def prefix_lm(lengths: torch.Tensor):
        def prefix(b, h, q_idx, kv_idx):
            return (kv_idx < lengths[b]) | (q_idx >= kv_idx)

        return prefix

    @staticmethod
    def key_padding(lengths: torch.Tensor):
        def pad(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]

        return pad

    @staticmethod
    def chunked(chunk: int):
        def chunk_mask(b, h, q_idx, kv_idx):
            return (q_idx // chunk == kv_idx // chunk) & (q_idx >= kv_idx)

        return chunk_mask

    @staticmethod
    def alibi(slopes: torch.Tensor):
        def alibi_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        return alibi_mod

    @staticmethod
    def alibi_slopes_bloom(n_heads: int) -> torch.Tensor:
        p = 2 ** math.floor(math.log2(n_heads))
        base = 2.0 ** (-(2.0 ** -(math.log2(p) - 3)))
        slopes = [base ** (i + 1) for i in range(p)]
        if p < n_heads:
            extra = 2.0 ** (-(2.0 ** -(math.log2(2 * p) - 3)))
            slopes += [extra ** (2 * i + 1) for i in range(n_heads - p)]
        return torch.tensor(slopes, dtype=torch.float32)

    @staticmethod
    def softcap(cap: float):
        def softcap_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / cap) * cap

        return softcap_mod

    @staticmethod
    def relative_position_bias(table: torch.Tensor, max_distance: int):
        def rel_bias(score, b, h, q_idx, kv_idx):
            rel = torch.clamp(kv_idx - q_idx, -max_distance, max_distance) + max_distance
            return score + table[h, rel]

        return rel_bias


def mods_lib() -> Any:
    """``hf_flexattn.mods`` if it is importable, else the local stand-ins."""
    return _mods if _mods is not None else _LocalMods


M = mods_lib()


@dataclass(frozen=True)
class ZooCase:
    """One attention case: shapes plus ``build(device) -> (score_mod, mask_mod, params)``.

    ``mask_b`` / ``mask_h``: the block mask must be built per batch / per head (the mask_mod
    reads ``b`` / ``h``); otherwise it broadcasts (B = H = 1). ``params`` are the captured
    tensors that require grad; their gradients are checked too.
    """

    name: str
    build: Callable[[torch.device], Mods]
    B: int = 1
    Hq: int = 2
    Hkv: int = 2
    L: int = 64
    S: int = 64
    E: int = 16
    Ev: int = 16
    block_size: tuple[int, int] = (16, 16)
    mask_b: bool = False
    mask_h: bool = False
    scale: float | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def gqa(self) -> bool:
        return self.Hq != self.Hkv

    def __repr__(self) -> str:
        return self.name


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(
    case: ZooCase,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Random q ``[B,Hq,L,E]``, k ``[B,Hkv,S,E]``, v ``[B,Hkv,S,Ev]`` (leaves) in ``dtype``."""
    g = _g(seed)
    q = torch.randn(case.B, case.Hq, case.L, case.E, generator=g)
    k = torch.randn(case.B, case.Hkv, case.S, case.E, generator=g)
    v = torch.randn(case.B, case.Hkv, case.S, case.Ev, generator=g)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v))


def make_block_mask(
    case: ZooCase, mask_mod: Callable | None, device: torch.device | str = "cpu"
) -> Any:
    """BlockMask for the case (hf_flexattn's builder if present, else torch's)."""
    try:
        from hf_flexattn.block_mask import create_block_mask
    except ImportError:  # pragma: no cover - only while modules are written
        from torch.nn.attention.flex_attention import create_block_mask
    if mask_mod is None:
        from torch.nn.attention.flex_attention import noop_mask

        mask_mod = noop_mask
    return create_block_mask(
        mask_mod,
        case.B if case.mask_b else None,
        case.Hq if case.mask_h else None,
        case.L,
        case.S,
        device=device,
        BLOCK_SIZE=case.block_size,
    )


# --------------------------------------------------------------------------- builders
def _mask_only(factory: Callable[[torch.device], Callable]) -> Callable[[torch.device], Mods]:
    return lambda dev: (None, factory(dev), [])


def _ragged_doc_ids(lengths: list[int], dev: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(dev)


def _slopes(n_heads: int, dev: torch.device) -> torch.Tensor:
    return torch.as_tensor(M.alibi_slopes_bloom(n_heads), dtype=torch.float32).to(dev)


def _full(dev):
    return None, None, []


def _softcap_causal(dev):
    return M.softcap(20.0), M.causal_mask, []


def _alibi_causal(dev):
    return M.alibi(_slopes(6, dev)), M.causal_mask, []


def _rel_bias_learnable(dev):
    table = (0.3 * torch.randn(2, 17, generator=_g(1))).to(dev).requires_grad_(True)
    return M.relative_position_bias(table, 8), M.causal_mask, [table]


def _head_bias_learnable(dev):
    slope = torch.tensor([0.05, -0.02, 0.1, 0.03], device=dev, requires_grad=True)

    def head_bias(score, b, h, q_idx, kv_idx):
        return score + slope[h] * (q_idx - kv_idx).float()

    return head_bias, M.sliding_window(20), [slope]


def _query_temp_learnable(dev):
    temp = (1 + 0.2 * torch.randn(48, generator=_g(2))).to(dev).requires_grad_(True)

    def q_temp(score, b, h, q_idx, kv_idx):
        return score * temp[q_idx]

    return q_temp, M.causal_mask, [temp]


def _kv_batch_bias_learnable(dev):
    kv_bias = (0.5 * torch.randn(2, 40, generator=_g(3))).to(dev).requires_grad_(True)
    b_scale = torch.tensor([1.0, 0.5], device=dev, requires_grad=True)

    def kv_b_bias(score, b, h, q_idx, kv_idx):
        return score * b_scale[b] + kv_bias[b, kv_idx]

    return kv_b_bias, None, [kv_bias, b_scale]


def _partial_index_learnable(dev):
    # partial indexing of a learnable capture (a row, then an element): vmap path + autograd
    table = (0.2 * torch.randn(3, 5, generator=_g(6))).to(dev).requires_grad_(True)

    def row_bias(score, b, h, q_idx, kv_idx):
        row = table[h]
        return score + row[(q_idx - kv_idx) % 5]

    return row_bias, M.causal_mask, [table]


def _nested_offsets(dev):
    doc = _ragged_doc_ids([11, 20, 5, 28], dev)
    offsets = torch.tensor([0, 11, 31, 36, 64], device=dev)

    def nested(b, h, q_idx, kv_idx):
        return (kv_idx >= offsets[doc[q_idx]]) & (kv_idx <= q_idx)

    return None, nested, []


def _intervals(dev):
    intervals = torch.tensor([[0, 20], [10, 45], [30, 64]], device=dev)
    image_id = torch.randint(0, 3, (64,), generator=_g(4)).to(dev)

    def interval_mask(b, h, q_idx, kv_idx):
        row = intervals[image_id[kv_idx]]
        return ((q_idx >= row[0]) & (q_idx < row[1])) | (q_idx == kv_idx)

    return None, interval_mask, []


def _bits(dev):
    def bit_mask(b, h, q_idx, kv_idx):
        return (((q_idx ^ kv_idx) & 3) != 1) & ((q_idx // 3) % 4 >= (kv_idx >> 2) % 3) | (
            (kv_idx << 1) % 7 == h
        )

    def bit_score(score, b, h, q_idx, kv_idx):
        return score + ((q_idx & 7) - (kv_idx % 5)).float() * 0.1

    return bit_score, bit_mask, []


def _empty_rows(dev):
    def holes(b, h, q_idx, kv_idx):
        # q-block 1 (rows 16..31) sees nothing; rows q % 7 == 3 see nothing
        return (q_idx >= kv_idx) & (q_idx // 16 != 1) & (q_idx % 7 != 3)

    return None, holes, []


def _empty_rows_per_batch(dev):
    lengths = torch.tensor([0, 30], device=dev)  # batch 0 sees nothing at all

    def pad_rows(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & (q_idx < lengths[b] + 5)

    return None, pad_rows, []


def _nan_outside(dev):
    # score_mod that is NaN on masked positions (sqrt of a negative): must not leak
    def sqrt_dist(score, b, h, q_idx, kv_idx):
        return score * torch.sqrt((q_idx - kv_idx).float() + 1.0)

    return sqrt_dist, M.causal_mask, []


def _and_or(dev):
    lengths = torch.tensor([9, 30], device=dev)
    mask = or_masks(and_masks(M.causal_mask, M.sliding_window(12)), M.prefix_lm(lengths))
    return None, mask, []


def _doc_causal(dev):
    return None, M.document_mask(_ragged_doc_ids([13, 40, 7, 60], dev), causal=True), []


def _doc_bidir(dev):
    return None, M.document_mask(_ragged_doc_ids([50, 3, 47], dev), causal=False), []


def _prefix(dev):
    return None, M.prefix_lm(torch.tensor([10, 25], device=dev)), []


def _key_padding(dev):
    return None, M.key_padding(lengths=torch.tensor([37, 20], device=dev)), []


def _decode(offset: int):
    return lambda dev: (None, M.causal(offset), [])


def _decode_alibi(offset: int):
    def build(dev):
        return M.alibi(_slopes(4, dev)), M.causal(offset), []

    return build


ZOO: list[ZooCase] = [
    ZooCase("full", _full, L=40, S=40),
    ZooCase("causal", _mask_only(lambda d: M.causal_mask), L=100, S=100, E=32, Ev=32),
    ZooCase(
        "sliding_window",
        _mask_only(lambda d: M.sliding_window(24)),
        L=200,
        S=200,
        block_size=(32, 32),
    ),
    ZooCase("document_causal", _doc_causal, B=2, L=120, S=120),
    ZooCase("document_bidirectional", _doc_bidir, L=100, S=100, block_size=(16, 32)),
    ZooCase("prefix_lm", _prefix, B=2, L=48, S=48, mask_b=True),
    ZooCase("key_padding_cross", _key_padding, B=2, L=20, S=37, mask_b=True),
    ZooCase("chunked", _mask_only(lambda d: M.chunked(16)), L=70, S=70),
    ZooCase("alibi_causal", _alibi_causal, Hq=6, Hkv=6, L=50, S=50),
    ZooCase("softcap_causal", _softcap_causal, L=64, S=64, scale=1.0),
    ZooCase("rel_bias_learnable", _rel_bias_learnable, L=60, S=60, tags=("learnable",)),
    ZooCase(
        "head_bias_learnable", _head_bias_learnable, Hq=4, Hkv=2, L=50, S=50, tags=("learnable",)
    ),
    ZooCase("query_temp_learnable", _query_temp_learnable, L=48, S=48, tags=("learnable",)),
    ZooCase(
        "kv_batch_bias_learnable", _kv_batch_bias_learnable, B=2, L=24, S=40, tags=("learnable",)
    ),
    ZooCase(
        "partial_index_learnable",
        _partial_index_learnable,
        Hq=3,
        Hkv=3,
        L=36,
        S=36,
        tags=("learnable",),
    ),
    ZooCase("and_or_masks", _and_or, B=2, L=40, S=40, mask_b=True),
    ZooCase("nested_offsets", _nested_offsets, L=64, S=64),
    ZooCase("intervals_row_index", _intervals, L=64, S=64),
    ZooCase("bit_ops_floordiv_mod", _bits, Hq=3, Hkv=3, L=45, S=45, mask_h=True),
    ZooCase("rows_see_nothing", _empty_rows, L=64, S=64),
    ZooCase("batch_sees_nothing", _empty_rows_per_batch, B=2, L=37, S=37, mask_b=True),
    ZooCase("score_nan_where_masked", _nan_outside, L=40, S=40),
    ZooCase("ragged_37", _mask_only(lambda d: M.causal_mask), L=37, S=37),
    ZooCase(
        "ragged_cross_37x300", _mask_only(lambda d: M.causal(263)), L=37, S=300, block_size=(16, 64)
    ),
    ZooCase("decode_1", _decode(299), Hq=4, Hkv=2, L=1, S=300, block_size=(16, 64)),
    ZooCase("decode_4_alibi", _decode_alibi(296), Hq=4, Hkv=4, L=4, S=300, block_size=(16, 64)),
    ZooCase("decode_16_gqa3", _decode(284), Hq=6, Hkv=2, L=16, S=300, block_size=(16, 64)),
    ZooCase("gqa_6_3_causal", _mask_only(lambda d: M.causal_mask), Hq=6, Hkv=3, L=33, S=33),
    ZooCase("ev_ne_e", _mask_only(lambda d: M.causal_mask), E=32, Ev=16, L=40, S=40),
    ZooCase("ev_gt_e_cross", _full, E=16, Ev=48, L=24, S=56),
    ZooCase("head_dim_80", _mask_only(lambda d: M.sliding_window(16)), E=80, Ev=80, L=48, S=48),
    ZooCase("head_dim_96", _softcap_causal, E=96, Ev=96, L=40, S=40),
]

ZOO_BY_NAME: dict[str, ZooCase] = {c.name: c for c in ZOO}
assert len(ZOO_BY_NAME) == len(ZOO), "zoo case names must be unique"
