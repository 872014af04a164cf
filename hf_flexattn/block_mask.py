"""Block masks: the sparse tile map of an attention mask, and the builders that make them.

A :class:`BlockMask` splits the ``[Q_LEN, KV_LEN]`` score matrix into ``Q_BLOCK x KV_BLOCK``
tiles and records, per q-block, which kv-blocks are *partial* (``mask_mod`` must be applied)
and which are *full* (every position allowed, ``mask_mod`` skipped); the q-side lists (per
kv-block, which q-blocks) are the transposes, used by the backward pass.  The layout is
torch's (:class:`torch.nn.attention.flex_attention.BlockMask`), and our class subclasses it,
so it is accepted anywhere torch's is.

Builders:

* :func:`create_block_mask` -- generic: evaluates any ``mask_mod`` tile row by tile row in
  bounded memory (never the whole ``B x H x Q x KV`` boolean at once).
* :func:`create_causal_block_mask`, :func:`create_sliding_window_block_mask`,
  :func:`create_document_block_mask` -- analytic: block tables from arithmetic on block
  extents in O(number of blocks), equal bit for bit to :func:`create_block_mask` on the same
  ``mask_mod`` (which they attach).

Both kinds end in :func:`_block_mask_from_block_tables`, so the index tensors are ordered the
same way as torch's ``create_block_mask``: per row the listed blocks first, ascending, then the
remaining block indices ascending; counts and indices are ``int32``.  Tiles are classified as
torch does: an edge tile cut by ``Q_LEN``/``KV_LEN`` counts its missing positions as
"not allowed", so it is never full.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask as _TorchBlockMask

from ._mod_eval import (
    _num_positional,
    check_mod_arity,
    eval_mask_mod,
    eval_score_mod,
    freeze,
    is_frozen,
)

__all__ = [
    "BlockMask",
    "and_masks",
    "create_block_mask",
    "create_causal_block_mask",
    "create_document_block_mask",
    "create_mask",
    "create_sliding_window_block_mask",
    "ensure_q_indices",
    "noop_mask",
    "or_masks",
]

logger = logging.getLogger(__name__)

_DEFAULT_BLOCK = 128
# Positions of one evaluated mask chunk in the generic builder (bool -> 1 byte each; the mod's
# intermediates are a few times that).  Small enough to stay cache-friendly: on CPU 4 Mi was
# about twice as fast as 32 Mi (4-16 Mi about equal).
_CHUNK_ELEMS = 8 * 1024 * 1024
_BIG = 1 << 62


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_pos_int(name: str, x: Any) -> int:
    if not _is_int(x) or x <= 0:
        raise ValueError(f"{name} must be a positive int, got {x!r}.")
    return x


def _check_opt_pos_int(name: str, x: Any) -> int:
    if x is None:
        return 1
    if not _is_int(x) or x <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {x!r}.")
    return x


def _check_nonneg_int(name: str, x: Any) -> int:
    if not _is_int(x) or x < 0:
        raise ValueError(f"{name} must be a non-negative int, got {x!r}.")
    return x


def _normalize_block_size(BLOCK_SIZE: Any) -> tuple[int, int]:
    if _is_int(BLOCK_SIZE) and BLOCK_SIZE > 0:
        return (BLOCK_SIZE, BLOCK_SIZE)
    if (
        isinstance(BLOCK_SIZE, (tuple, list))
        and len(BLOCK_SIZE) == 2
        and all(_is_int(v) and v > 0 for v in BLOCK_SIZE)
    ):
        return (int(BLOCK_SIZE[0]), int(BLOCK_SIZE[1]))
    raise ValueError(
        "BLOCK_SIZE must be a positive int or a pair (Q_BLOCK, KV_BLOCK) of positive ints, "
        f"got {BLOCK_SIZE!r}."
    )


def _default_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be a torch.device or a device string, got {device!r}."
        ) from err


def _mod_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# ordered <-> dense block tables
# --------------------------------------------------------------------------------------------
def _dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """``dense [..., R, C]`` 0/1 table -> (counts ``[..., R]`` int32, indices ``[..., R, C]``
    int32): listed blocks first in ascending order, then the rest ascending."""
    dense = dense.to(torch.int32)
    counts = dense.sum(dim=-1).to(torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), order.contiguous()


def _ordered_to_dense(counts: Tensor, indices: Tensor, num_cols: int) -> Tensor:
    """(counts ``[..., R]``, indices ``[..., R, K]``) -> dense int32 0/1 table ``[..., R, C]``."""
    *batch, rows, k = indices.shape
    dense = torch.zeros(*batch, rows, num_cols + 1, dtype=torch.int32, device=indices.device)
    slot = torch.arange(k, device=indices.device)
    keep = slot < counts.unsqueeze(-1).to(slot.dtype)
    cols = torch.where(keep, indices.to(torch.int64), num_cols)
    dense.scatter_(-1, cols, 1)
    return dense[..., :num_cols]


def _transpose_ordered(counts: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """kv-side lists -> q-side lists (per kv-block the q-blocks), same ordering rule."""
    dense = _ordered_to_dense(counts, indices, indices.shape[-1])
    return _dense_to_ordered(dense.transpose(-2, -1))


# --------------------------------------------------------------------------------------------
# BlockMask
# --------------------------------------------------------------------------------------------
def _sliced_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    raise RuntimeError(
        "This BlockMask was sliced over batch/head/q-blocks, so its mask_mod no longer knows "
        "which original (b, h, q_idx) it is evaluated at. Set `sliced.mask_mod` from the "
        "original BlockMask's mask_mod, adapted to the slice."
    )


class BlockMask(_TorchBlockMask):
    """torch's :class:`~torch.nn.attention.flex_attention.BlockMask` with q-side indices kept.

    Tensors (torch's layout): ``kv_num_blocks [B, H, nQ]``, ``kv_indices [B, H, nQ, nKV]``
    (partial tiles), ``full_kv_num_blocks``/``full_kv_indices`` (full tiles), and the
    transposes ``q_num_blocks [B, H, nKV]``, ``q_indices [B, H, nKV, nQ]``,
    ``full_q_*``, all ``int32``.  ``BLOCK_SIZE = (Q_BLOCK, KV_BLOCK)``,
    ``seq_lengths = (Q_LEN, KV_LEN)``, ``mask_mod`` the exact mask for partial tiles.

    Construct with :meth:`from_kv_blocks` (inherited) or the builders of this module;
    :meth:`from_torch` converts any torch BlockMask.  ``to``, ``__getitem__`` return this class.
    """

    @classmethod
    def from_torch(cls, bm: _TorchBlockMask) -> BlockMask:
        """Convert a torch BlockMask (or ours) to this class, computing q-side indices if absent.

        Shares the tensors of ``bm``; returns ``bm`` itself when it already is a complete
        instance of this class.
        """
        if not isinstance(bm, _TorchBlockMask):
            raise TypeError(
                f"bm must be a torch.nn.attention.flex_attention.BlockMask, got "
                f"{type(bm).__name__}."
            )
        complete = (
            bm.q_indices is not None
            and bm.q_num_blocks is not None
            and (bm.full_kv_indices is None or bm.full_q_indices is not None)
        )
        if type(bm) is cls and complete:
            return bm
        new = cls.__new__(cls)
        new.__dict__.update(bm.__dict__)
        if bm.q_indices is None or bm.q_num_blocks is None:
            new.q_num_blocks, new.q_indices = _transpose_ordered(bm.kv_num_blocks, bm.kv_indices)
        if bm.full_kv_indices is not None and (
            bm.full_q_indices is None or bm.full_q_num_blocks is None
        ):
            new.full_q_num_blocks, new.full_q_indices = _transpose_ordered(
                bm.full_kv_num_blocks, bm.full_kv_indices
            )
        return new

    @property
    def ndim(self) -> int:
        """4, like the dense ``[B, H, Q_LEN, KV_LEN]`` mask it stands for (Transformers
        reads ``attention_mask.ndim``)."""
        return 4

    def to(self, device: torch.device | str | torch.dtype) -> BlockMask:
        """A copy with every index tensor moved to ``device`` (``mask_mod`` is unchanged).

        A ``torch.dtype`` returns ``self``: a block mask has no value dtype to convert (model
        code written for dense masks calls ``mask.to(dtype)``)."""
        if isinstance(device, torch.dtype):
            return self
        new = copy.copy(self)
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor):
                setattr(new, name, value.to(device))
        return new

    def __getitem__(self, index: Any) -> BlockMask:
        """Select batch / head / q-block entries; dims are kept (an int ``i`` acts as
        ``i:i+1``), so the result stays ``[B', H', nQ', ...]``.

        ``mask_mod`` is kept when the selection leaves every (b, h, q-block) at its original
        index; otherwise it is replaced by one that raises (the slice changed the indices).
        """
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError(
                f"BlockMask can be indexed over (batch, head, q-block), got {len(index)} indices."
            )
        if self.kv_num_blocks.dim() != 3:
            raise IndexError(
                "BlockMask indexing needs kv_num_blocks of shape [B, H, nQ], got "
                f"{tuple(self.kv_num_blocks.shape)}."
            )
        padded = (*index, slice(None), slice(None), slice(None))[:3]
        sizes = self.kv_num_blocks.shape
        norm = []
        for i, n in zip(padded, sizes):
            if _is_int(i):
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of range for a dimension of size {n}.")
                i = i + n if i < 0 else i
                norm.append(slice(i, i + 1))
            else:
                norm.append(i)
        idx = tuple(norm)

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        kv_num, kv_idx = take(self.kv_num_blocks), take(self.kv_indices)
        full_num, full_idx = take(self.full_kv_num_blocks), take(self.full_kv_indices)
        same_q = isinstance(idx[2], slice) and idx[2] == slice(None)
        if same_q and self.q_indices is not None and self.q_num_blocks is not None:
            bh = idx[:2] + (slice(None),)
            q_num, q_idx = self.q_num_blocks[bh], self.q_indices[bh]
        else:
            q_num, q_idx = _transpose_ordered(kv_num, kv_idx)
        if full_num is None:
            fq_num, fq_idx = None, None
        elif same_q and self.full_q_indices is not None and self.full_q_num_blocks is not None:
            bh = idx[:2] + (slice(None),)
            fq_num, fq_idx = self.full_q_num_blocks[bh], self.full_q_indices[bh]
        else:
            fq_num, fq_idx = _transpose_ordered(full_num, full_idx)

        def keeps_origin(i: Any) -> bool:
            return isinstance(i, slice) and (i.start in (None, 0)) and (i.step in (None, 1))

        mask_mod = self.mask_mod if all(keeps_origin(i) for i in idx) else _sliced_mask_mod
        return type(self)(
            seq_lengths=self.seq_lengths,
            kv_num_blocks=kv_num,
            kv_indices=kv_idx,
            full_kv_num_blocks=full_num,
            full_kv_indices=full_idx,
            q_num_blocks=q_num,
            q_indices=q_idx,
            full_q_num_blocks=fq_num,
            full_q_indices=fq_idx,
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=mask_mod,
        )


def ensure_q_indices(bm: _TorchBlockMask) -> BlockMask:
    """Return ``bm`` as our :class:`BlockMask` with ``q_*`` (and ``full_q_*``) filled in."""
    return BlockMask.from_torch(bm)


def _block_mask_from_block_tables(
    partial: Tensor,
    full: Tensor,
    Q_LEN: int,
    KV_LEN: int,
    BLOCK_SIZE: tuple[int, int],
    mask_mod: Callable,
) -> BlockMask:
    """Build a :class:`BlockMask` from boolean tile tables ``partial``/``full [B, H, nQ, nKV]``.

    A tile must not be both partial and full.  Ordering and dtypes are torch's
    ``create_block_mask`` (so equal tables give equal BlockMasks bit for bit).
    """
    kv_num, kv_idx = _dense_to_ordered(partial)
    fkv_num, fkv_idx = _dense_to_ordered(full)
    q_num, q_idx = _dense_to_ordered(partial.transpose(-2, -1))
    fq_num, fq_idx = _dense_to_ordered(full.transpose(-2, -1))
    return BlockMask(
        seq_lengths=(Q_LEN, KV_LEN),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=fkv_num,
        full_kv_indices=fkv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=fq_num,
        full_q_indices=fq_idx,
        BLOCK_SIZE=tuple(BLOCK_SIZE),
        mask_mod=mask_mod,
    )


# --------------------------------------------------------------------------------------------
# mask combinators
# --------------------------------------------------------------------------------------------
def noop_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Allow every position."""
    return b.new_ones((), dtype=torch.bool)


def _check_mods(fn_name: str, mods: tuple) -> None:
    for i, m in enumerate(mods):
        if not callable(m):
            raise TypeError(
                f"{fn_name} takes mask_mods (callables (b, h, q_idx, kv_idx) -> bool); "
                f"argument {i} is a {type(m).__name__}."
            )
        check_mod_arity(m, 4, f"{fn_name} argument {i}")


def and_masks(*mask_mods: Callable) -> Callable:
    """The intersection of ``mask_mods`` (all allowed); with none, everything is allowed.

    The result is named ``and(<name1>,<name2>,...)``.
    """
    _check_mods("and_masks", mask_mods)

    def and_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = b.new_ones((), dtype=torch.bool)
        for m in mask_mods:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    name = "and(" + ",".join(_mod_name(m) for m in mask_mods) + ")"
    and_mask.__name__ = and_mask.__qualname__ = name
    return freeze(and_mask) if all(is_frozen(m) for m in mask_mods) else and_mask


def or_masks(*mask_mods: Callable) -> Callable:
    """The union of ``mask_mods`` (any allows); with none, nothing is allowed.

    The result is named ``or(<name1>,<name2>,...)``.
    """
    _check_mods("or_masks", mask_mods)

    def or_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = b.new_zeros((), dtype=torch.bool)
        for m in mask_mods:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    name = "or(" + ",".join(_mod_name(m) for m in mask_mods) + ")"
    or_mask.__name__ = or_mask.__qualname__ = name
    return freeze(or_mask) if all(is_frozen(m) for m in mask_mods) else or_mask


# --------------------------------------------------------------------------------------------
# dense mask and generic builder
# --------------------------------------------------------------------------------------------
def create_mask(
    mod_fn: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Dense ``[B, H, Q_LEN, KV_LEN]`` bool mask of a ``mask_mod`` (4 args) or ``score_mod``
    (5 args; True where the modified score of a zero score is not ``-inf``).

    Materialises the whole mask: for small shapes (tests, pictures).
    """
    if not callable(mod_fn):
        raise TypeError(f"mod_fn must be callable, got {type(mod_fn).__name__}.")
    n = _num_positional(mod_fn)
    if n not in (4, 5, None):
        raise TypeError(
            "mod_fn must be a mask_mod (b, h, q_idx, kv_idx) or a score_mod "
            f"(score, b, h, q_idx, kv_idx), but {_mod_name(mod_fn)!r} takes {n} arguments."
        )
    B = _check_opt_pos_int("B", B)
    H = _check_opt_pos_int("H", H)
    Q_LEN = _check_pos_int("Q_LEN", Q_LEN)
    KV_LEN = _check_pos_int("KV_LEN", KV_LEN)
    dev = _default_device(device)
    b = torch.arange(B, device=dev)
    h = torch.arange(H, device=dev)
    q = torch.arange(Q_LEN, device=dev)
    kv = torch.arange(KV_LEN, device=dev)
    if n == 5:
        score = torch.zeros(B, H, Q_LEN, KV_LEN, device=dev)
        out = eval_score_mod(mod_fn, score, b, h, q, kv)
        return ~torch.isneginf(out)
    return eval_mask_mod(mod_fn, b, h, q, kv).contiguous()


def _classify_chunk(x: Tensor, QB: int, KVB: int) -> tuple[Tensor, Tensor]:
    """``x [b, h, M, N]`` bool (tiles aligned at 0; ``M``/``N`` may be ragged) ->
    (any, all) ``[b, h, ceil(M/QB), ceil(N/KVB)]``; ragged tiles are never "all"."""
    b, h, M, N = x.shape
    u = x.view(torch.uint8) if x.dtype == torch.bool else x.to(torch.uint8)
    nk_main = N // KVB
    parts_any, parts_all = [], []
    if nk_main:
        main = u[..., : nk_main * KVB].unflatten(-1, (nk_main, KVB))
        parts_any.append(main.amax(-1))
        parts_all.append(main.amin(-1))
    if N % KVB:
        tail = u[..., nk_main * KVB :]
        parts_any.append(tail.amax(-1, keepdim=True))
        parts_all.append(torch.zeros_like(parts_any[-1]))
    r_any = parts_any[0] if len(parts_any) == 1 else torch.cat(parts_any, -1)
    r_all = parts_all[0] if len(parts_all) == 1 else torch.cat(parts_all, -1)
    nq = _cdiv(M, QB)
    if nq * QB != M:
        pad = nq * QB - M
        r_any = torch.nn.functional.pad(r_any, (0, 0, 0, pad))
        r_all = torch.nn.functional.pad(r_all, (0, 0, 0, pad))
    t_any = r_any.unflatten(2, (nq, QB)).amax(3).bool()
    t_all = r_all.unflatten(2, (nq, QB)).amin(3).bool()
    return t_any, t_all


def create_block_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK,
    _compile: bool = False,
) -> BlockMask:
    """Build a :class:`BlockMask` by evaluating ``mask_mod`` tile by tile.

    Same signature and result as :func:`torch.nn.attention.flex_attention.create_block_mask`
    (``B``/``H`` ``None`` mean 1, i.e. broadcast; ``BLOCK_SIZE`` an int or
    ``(Q_BLOCK, KV_BLOCK)``; ``device`` defaults to CUDA when available, else CPU).  The mask
    is evaluated in chunks of at most ~8 Mi positions, so memory stays bounded for long
    sequences.  ``_compile`` is accepted for compatibility and ignored.
    """
    check_mod_arity(mask_mod, 4, "mask_mod")
    B = _check_opt_pos_int("B", B)
    H = _check_opt_pos_int("H", H)
    Q_LEN = _check_pos_int("Q_LEN", Q_LEN)
    KV_LEN = _check_pos_int("KV_LEN", KV_LEN)
    QB, KVB = _normalize_block_size(BLOCK_SIZE)
    dev = _default_device(device)
    if _compile:
        logger.debug("create_block_mask: _compile=True is ignored (nothing to compile).")

    nQ, nKV = _cdiv(Q_LEN, QB), _cdiv(KV_LEN, KVB)
    b_all = torch.arange(B, device=dev)
    h_all = torch.arange(H, device=dev)
    # Probe one position for every (b, h): checks the return type early and tells whether
    # the result depends on b / h at all (broadcast results come back with stride 0).
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    probe = eval_mask_mod(mask_mod, b_all, h_all, zero, zero)
    b_dep = B > 1 and probe.stride(0) != 0
    h_dep = H > 1 and probe.stride(1) != 0
    Be, He = (B if b_dep else 1), (H if h_dep else 1)

    # chunk sizes: kv blocks first (whole rows), then q blocks, then heads, then batch
    kc = max(1, min(nKV, _CHUNK_ELEMS // (QB * KVB)))
    per_q = QB * kc * KVB
    qc = max(1, min(nQ, _CHUNK_ELEMS // per_q))
    per_h = per_q * qc
    hc = max(1, min(He, _CHUNK_ELEMS // per_h))
    bc = max(1, min(Be, _CHUNK_ELEMS // (per_h * hc)))

    t_any = torch.zeros(Be, He, nQ, nKV, dtype=torch.bool, device=dev)
    t_all = torch.zeros(Be, He, nQ, nKV, dtype=torch.bool, device=dev)
    for b0 in range(0, Be, bc):
        bi = b_all[b0 : b0 + bc] if b_dep else b_all[:1]
        for h0 in range(0, He, hc):
            hi = h_all[h0 : h0 + hc] if h_dep else h_all[:1]
            for i0 in range(0, nQ, qc):
                q = torch.arange(i0 * QB, min((i0 + qc) * QB, Q_LEN), device=dev)
                for j0 in range(0, nKV, kc):
                    kv = torch.arange(j0 * KVB, min((j0 + kc) * KVB, KV_LEN), device=dev)
                    x = eval_mask_mod(mask_mod, bi, hi, q, kv)
                    # a result that did not depend on b/h here: reduce one copy only
                    if x.shape[0] > 1 and x.stride(0) == 0:
                        x = x[:1]
                    if x.shape[1] > 1 and x.stride(1) == 0:
                        x = x[:, :1]
                    a, f = _classify_chunk(x, QB, KVB)
                    sl = (
                        slice(b0, b0 + bi.numel()),
                        slice(h0, h0 + hi.numel()),
                        slice(i0, i0 + a.shape[2]),
                        slice(j0, j0 + a.shape[3]),
                    )
                    t_any[sl] = a
                    t_all[sl] = f
    full = t_all.expand(B, H, nQ, nKV)
    partial = (t_any & ~t_all).expand(B, H, nQ, nKV)
    return _block_mask_from_block_tables(partial, full, Q_LEN, KV_LEN, (QB, KVB), mask_mod)


# --------------------------------------------------------------------------------------------
# analytic builders
# --------------------------------------------------------------------------------------------
def _band_tables(
    Q_LEN: int,
    KV_LEN: int,
    QB: int,
    KVB: int,
    q_offset: int,
    lo: int | None,
    hi: int | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Tiles of the band ``lo <= kv_idx - (q_idx + q_offset) <= hi`` (``None``: unbounded).

    Returns (any, all) ``[nQ, nKV]`` bool; ragged edge tiles are never "all".
    """
    nQ, nKV = _cdiv(Q_LEN, QB), _cdiv(KV_LEN, KVB)
    i = torch.arange(nQ, device=device, dtype=torch.int64)
    j = torch.arange(nKV, device=device, dtype=torch.int64)
    q_lo = i * QB + q_offset
    q_hi = torch.clamp((i + 1) * QB, max=Q_LEN) - 1 + q_offset
    k_lo = j * KVB
    k_hi = torch.clamp((j + 1) * KVB, max=KV_LEN) - 1
    d_min = k_lo[None, :] - q_hi[:, None]  # smallest kv - q in the tile
    d_max = k_hi[None, :] - q_lo[:, None]  # largest
    t_any = torch.ones(nQ, nKV, dtype=torch.bool, device=device)
    t_all = (((i + 1) * QB <= Q_LEN)[:, None] & ((j + 1) * KVB <= KV_LEN)[None, :]).clone()
    if lo is not None:
        t_any &= d_max >= lo
        t_all &= d_min >= lo
    if hi is not None:
        t_any &= d_min <= hi
        t_all &= d_max <= hi
    return t_any, t_all


def _finish_analytic(
    t_any: Tensor,
    t_all: Tensor,
    B: int,
    H: int,
    Q_LEN: int,
    KV_LEN: int,
    block: tuple[int, int],
    mask_mod: Callable,
) -> BlockMask:
    nQ, nKV = t_any.shape[-2:]
    t_any = t_any.reshape(-1, 1, nQ, nKV) if t_any.dim() == 3 else t_any.view(1, 1, nQ, nKV)
    t_all = t_all.reshape(-1, 1, nQ, nKV) if t_all.dim() == 3 else t_all.view(1, 1, nQ, nKV)
    partial = (t_any & ~t_all).expand(B, H, nQ, nKV)
    full = t_all.expand(B, H, nQ, nKV)
    return _block_mask_from_block_tables(partial, full, Q_LEN, KV_LEN, block, mask_mod)


def _band_mod(q_offset: int, lo: int | None, hi: int | None, name: str) -> Callable:
    """mask_mod of ``lo <= kv_idx - (q_idx + q_offset) <= hi``."""

    def band(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        d = kv_idx - (q_idx + q_offset)
        if lo is None and hi is None:
            return d == d
        if lo is None:
            return d <= hi
        if hi is None:
            return d >= lo
        return (d >= lo) & (d <= hi)

    band.__name__ = band.__qualname__ = name
    return band


def _band_limits(causal: bool, window: int | None) -> tuple[int | None, int | None]:
    if window is None:
        return (None, 0) if causal else (None, None)
    return (1 - window, 0) if causal else (1 - window, window - 1)


def _band_name(causal: bool, window: int | None, q_offset: int) -> str:
    if window is None:
        name = "causal" if causal else "full"
    else:
        name = f"sliding_window_{window}" if causal else f"bidirectional_window_{window}"
    return name + (f"_offset_{q_offset}" if q_offset else "")


def create_causal_block_mask(
    Q_LEN: int,
    KV_LEN: int,
    *,
    q_offset: int = 0,
    B: int | None = None,
    H: int | None = None,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK,
) -> BlockMask:
    """Causal :class:`BlockMask`: query ``q_idx`` sees ``kv_idx <= q_idx + q_offset``.

    ``q_offset`` places the queries at the end of a longer KV (decode / KV cache:
    ``q_offset = KV_LEN - Q_LEN``).  Built from block arithmetic; equal to
    ``create_block_mask(mask.mask_mod, B, H, Q_LEN, KV_LEN, ...)``.
    """
    Q_LEN = _check_pos_int("Q_LEN", Q_LEN)
    KV_LEN = _check_pos_int("KV_LEN", KV_LEN)
    q_offset = _check_nonneg_int("q_offset", q_offset)
    B = _check_opt_pos_int("B", B)
    H = _check_opt_pos_int("H", H)
    block = _normalize_block_size(BLOCK_SIZE)
    dev = _default_device(device)
    lo, hi = _band_limits(True, None)
    t_any, t_all = _band_tables(Q_LEN, KV_LEN, *block, q_offset, lo, hi, dev)
    mod = _band_mod(q_offset, lo, hi, _band_name(True, None, q_offset))
    return _finish_analytic(t_any, t_all, B, H, Q_LEN, KV_LEN, block, mod)


def create_sliding_window_block_mask(
    window: int,
    Q_LEN: int,
    KV_LEN: int,
    *,
    q_offset: int = 0,
    causal: bool = True,
    B: int | None = None,
    H: int | None = None,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK,
) -> BlockMask:
    """Sliding-window :class:`BlockMask` (Transformers' convention).

    With ``i = q_idx + q_offset``: causal -> ``i - window < kv_idx <= i``; ``causal=False``
    -> ``|i - kv_idx| < window``.  Built from block arithmetic; equal to
    ``create_block_mask(mask.mask_mod, ...)``.
    """
    window = _check_pos_int("window", window)
    Q_LEN = _check_pos_int("Q_LEN", Q_LEN)
    KV_LEN = _check_pos_int("KV_LEN", KV_LEN)
    q_offset = _check_nonneg_int("q_offset", q_offset)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}.")
    B = _check_opt_pos_int("B", B)
    H = _check_opt_pos_int("H", H)
    block = _normalize_block_size(BLOCK_SIZE)
    dev = _default_device(device)
    lo, hi = _band_limits(causal, window)
    t_any, t_all = _band_tables(Q_LEN, KV_LEN, *block, q_offset, lo, hi, dev)
    mod = _band_mod(q_offset, lo, hi, _band_name(causal, window, q_offset))
    return _finish_analytic(t_any, t_all, B, H, Q_LEN, KV_LEN, block, mod)


def _as_int_tensor(name: str, t: Any, dims: tuple[int, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}.")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}.")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}.")
    return t.to(torch.int64)


def _document_ids_from_source(
    document_ids: Tensor | None,
    offsets: Tensor | None,
    cu_seqlens: Tensor | None,
    position_ids: Tensor | None,
) -> tuple[Tensor, bool]:
    """One document source -> (per-token ids ``[B, S]`` int64, negative = padding;
    whether the source was 1-D)."""
    given = {
        k: v
        for k, v in (
            ("document_ids", document_ids),
            ("offsets", offsets),
            ("cu_seqlens", cu_seqlens),
            ("position_ids", position_ids),
        )
        if v is not None
    }
    if len(given) != 1:
        raise ValueError(
            "create_document_block_mask needs exactly one of document_ids, offsets, "
            f"cu_seqlens, position_ids; got {sorted(given) or 'none'}."
        )
    ((name, src),) = given.items()
    t = _as_int_tensor(name, src, (1, 2))
    one_d = t.dim() == 1
    t2 = t.unsqueeze(0) if one_d else t
    if name == "document_ids":
        return t2, one_d
    if name == "position_ids":
        if bool((t2 < 0).any()):
            raise ValueError("position_ids must be non-negative.")
        starts = t2 == 0
        starts[:, 0] = True
        return torch.cumsum(starts.to(torch.int64), dim=-1) - 1, one_d
    # offsets / cu_seqlens: [n_docs + 1] from 0, non-decreasing (2-D rows padded by repeats)
    if t2.shape[-1] < 2:
        raise ValueError(
            f"{name} must have at least 2 entries [0, ..., total], got shape {tuple(t.shape)}."
        )
    if bool((t2[:, 0] != 0).any()):
        raise ValueError(f"{name} must start at 0, got first entries {t2[:, 0].tolist()}.")
    if bool((t2[:, 1:] < t2[:, :-1]).any()):
        raise ValueError(f"{name} must be non-decreasing.")
    totals = t2[:, -1]
    S = int(totals.max())
    if S <= 0:
        raise ValueError(f"{name} describes no tokens (its last entry is 0).")
    pos = torch.arange(S, device=t2.device).expand(t2.shape[0], S).contiguous()
    ids = torch.searchsorted(t2.contiguous(), pos, right=True) - 1
    ids = torch.where(pos < totals[:, None], ids, -1)
    return ids, one_d


def _contiguous_documents(ids: Tensor) -> bool:
    """True when, in every row, each non-negative id occupies one contiguous run."""
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    runs = (starts & (ids >= 0)).sum(-1)
    s = ids.sort(dim=-1).values
    distinct = (s[:, :1] >= 0).sum(-1) + ((s[:, 1:] != s[:, :-1]) & (s[:, 1:] >= 0)).sum(-1)
    return bool((runs == distinct).all())


def _block_doc_ranges(rel: Tensor, L: int, blk: int) -> tuple[Tensor, Tensor, Tensor]:
    """``rel [B, L]`` (ordered doc labels, -1 padding) -> per block (min, max, single)."""
    n = _cdiv(L, blk)
    r = torch.nn.functional.pad(rel, (0, n * blk - L), value=-1).view(rel.shape[0], n, blk)
    valid = r >= 0
    d_max = r.amax(-1)
    d_min = torch.where(valid, r, _BIG).amin(-1)
    single = valid.all(-1) & (d_min == d_max)
    return d_min, d_max, single


def create_document_block_mask(
    *,
    document_ids: Tensor | None = None,
    offsets: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    causal: bool = True,
    window: int | None = None,
    Q_LEN: int | None = None,
    KV_LEN: int | None = None,
    q_offset: int = 0,
    H: int | None = None,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK,
) -> BlockMask:
    """:class:`BlockMask` for packed documents: a token attends only within its document.

    Exactly one source of document structure:

    * ``document_ids [S]`` or ``[B, S]``: per-token document id; negative (``-1``) marks
      padding, which never attends and is never attended;
    * ``offsets`` / ``cu_seqlens`` ``[n_docs + 1]`` (one packed row) or ``[B, n + 1]`` (rows
      padded with repeats of their last value): document boundaries starting at 0; tokens
      past a row's total are padding;
    * ``position_ids [S]`` or ``[B, S]``: positions restarting at 0 at each new document.

    All become per-token ids (one source of truth), which the returned ``mask_mod`` closes
    over.  With ``i = q_idx + q_offset`` (absolute query position), key ``kv_idx`` is
    visible when ``ids[i] == ids[kv_idx] >= 0`` and, if ``causal``, ``kv_idx <= i``; a
    ``window`` adds ``i - kv_idx < window`` (``|i - kv_idx| < window`` when not causal).
    ``Q_LEN``/``KV_LEN`` default to ``S`` (``Q_LEN`` to ``S - q_offset``); the mask has
    ``B`` rows (1 for 1-D sources) and ``H`` heads (default 1, broadcast).

    Block tables come from per-block document ranges in O(blocks) when each document is one
    contiguous run of tokens (always true for offsets / cu_seqlens / position_ids); other id
    layouts fall back to :func:`create_block_mask` (same result, slower).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}.")
    if window is not None:
        window = _check_pos_int("window", window)
    q_offset = _check_nonneg_int("q_offset", q_offset)
    H = _check_opt_pos_int("H", H)
    block = _normalize_block_size(BLOCK_SIZE)
    ids, one_d = _document_ids_from_source(document_ids, offsets, cu_seqlens, position_ids)
    dev = ids.device if device is None else _default_device(device)
    ids = ids.to(dev)
    B, S = ids.shape
    if Q_LEN is None:
        Q_LEN = S - q_offset
        if Q_LEN <= 0:
            raise ValueError(f"q_offset ({q_offset}) must be smaller than the id length ({S}).")
    Q_LEN = _check_pos_int("Q_LEN", Q_LEN)
    KV_LEN = _check_pos_int("KV_LEN", S if KV_LEN is None else KV_LEN)
    if Q_LEN + q_offset > S:
        raise ValueError(
            f"Q_LEN + q_offset ({Q_LEN} + {q_offset}) must be at most the number of tokens "
            f"described by the document source ({S})."
        )
    if KV_LEN > S:
        raise ValueError(
            f"KV_LEN ({KV_LEN}) must be at most the number of tokens described by the "
            f"document source ({S})."
        )

    lo, hi = _band_limits(causal, window)
    doc = ids[0] if one_d else ids

    if one_d:

        def _same_doc(b: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            dq = doc[q_idx + q_offset]
            return (dq == doc[kv_idx]) & (dq >= 0)
    else:

        def _same_doc(b: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            dq = doc[b, q_idx + q_offset]
            return (dq == doc[b, kv_idx]) & (dq >= 0)

    def document_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = _same_doc(b, q_idx, kv_idx)
        if lo is not None or hi is not None:
            d = kv_idx - (q_idx + q_offset)
            if lo is not None:
                ok = ok & (d >= lo)
            if hi is not None:
                ok = ok & (d <= hi)
        return ok

    name = (
        "document"
        if (lo is None and hi is None)
        else "document_" + _band_name(causal, window, q_offset)
    )
    document_mask.__name__ = document_mask.__qualname__ = name

    if not _contiguous_documents(ids):
        logger.debug(
            "create_document_block_mask: documents are not contiguous runs; "
            "evaluating the mask_mod tile by tile instead."
        )
        return create_block_mask(
            document_mask, B if not one_d else None, H, Q_LEN, KV_LEN, device=dev, BLOCK_SIZE=block
        )

    # relabel each run by its order in the row: same equality structure, ids now increase
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    rel = torch.where(ids >= 0, torch.cumsum(starts.to(torch.int64), -1), -1)
    QB, KVB = block
    q_min, q_max, q_single = _block_doc_ranges(rel[:, q_offset : q_offset + Q_LEN], Q_LEN, QB)
    k_min, k_max, k_single = _block_doc_ranges(rel[:, :KV_LEN], KV_LEN, KVB)
    doc_any = (q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None])
    doc_all = q_single[:, :, None] & k_single[:, None, :] & (q_min[:, :, None] == k_min[:, None, :])
    band_any, band_all = _band_tables(Q_LEN, KV_LEN, QB, KVB, q_offset, lo, hi, dev)
    t_any = doc_any & band_any
    t_all = doc_all & band_all
    return _finish_analytic(t_any, t_all, B, H, Q_LEN, KV_LEN, block, document_mask)
