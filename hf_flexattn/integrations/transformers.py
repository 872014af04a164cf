"""Transformers integration: the ``"flex"`` attention implementation.

:func:`register` adds two entries under one name (default ``"flex"``):

* to ``transformers.AttentionInterface``: :func:`flex_attention_forward`, which models call as
  ``(module, query [B, Hq, Lq, D], key [B, Hkv, Lk, D], value [B, Hkv, Lk, Dv], attention_mask,
  scaling=..., dropout=..., sliding_window=..., softcap=..., s_aux=..., **kwargs)`` and which
  returns ``(out [B, Lq, Hq, Dv], None)``;
* to ``transformers.masking_utils.AttentionMaskInterface``: :func:`flex_mask`, which turns
  Transformers' mask arguments into a :class:`~hf_flexattn.block_mask.BlockMask`. Without a mask
  function Transformers would pass ``attention_mask=None`` and padding and causality would be
  lost silently.

Mask construction never materialises an ``Lq x Lk`` mask. Transformers builds its
``mask_function`` from a few known factories (causal, sliding window, padding, packed
sequences, ...); :func:`flex_mask` recognises them and computes the tile map in O(blocks) from
positions ("block algebra" below), evaluating nothing element-wise. Anything it does not
recognise goes to the generic tiled builder. Offsets may be 0-d tensors (static caches): the
block tables are then computed on the device without a host sync.

Position conventions (Transformers' own): query row ``i`` sits at absolute position
``q_offset + i`` and key column ``j`` at ``kv_offset + j``; ``mask_function`` takes absolute
positions; the 2-D padding mask is indexed by absolute key position. A sliding window ``W``
allows ``q - W < kv <= q``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask as _TorchBlockMask
from transformers import masking_utils as mu

from hf_flexattn._mod_eval import freeze, freeze_family
from hf_flexattn.api import autocast_inputs
from hf_flexattn.api import flex_attention as _flex_attention
from hf_flexattn.backends import triton_backend as _tb
from hf_flexattn.block_mask import (
    BlockMask,
    _block_mask_from_block_tables,
    _dense_to_ordered,
    create_block_mask,
)

__all__ = [
    "BLOCK_SIZE",
    "MaskInfo",
    "flex_attention_forward",
    "flex_mask",
    "get_mask_info",
    "is_registered",
    "register",
    "unregister",
]

logger = logging.getLogger(__name__)

#: Tile size of the masks built here (Q and KV). Tests may lower it to exercise tiling.
BLOCK_SIZE: int = 128

_REGISTERED: set[str] = set()
_CACHE_SIZE = 16
_mask_cache: OrderedDict[tuple, tuple[Any, list]] = OrderedDict()


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
def register(name: str = "flex") -> None:
    """Register ``name`` with ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent. Also installs the (inert unless ``name`` is chosen) patches for the model
    families that bypass the attention interface (Bloom, Falcon, MPT); see
    :mod:`hf_flexattn.patches`. Afterwards ``from_pretrained(..., attn_implementation=name)``,
    ``from_config(cfg, attn_implementation=name)`` and ``model.set_attn_implementation(name)``
    work.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}.")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, flex_attention_forward)
    AttentionMaskInterface.register(name, flex_mask)
    _REGISTERED.add(name)
    from hf_flexattn import patches

    patches.install_auto(name)


def unregister(name: str = "flex") -> None:
    """Remove ``name`` from both interfaces and revert the automatic family patches."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    _REGISTERED.discard(name)
    from hf_flexattn import patches

    patches.uninstall_auto(name)


def is_registered(name: str) -> bool:
    """Whether ``name`` was registered by :func:`register` (and not unregistered)."""
    return name in _REGISTERED


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _block_mask_cls() -> type:
    return BlockMask


def _is_block_mask(x: Any) -> bool:
    return isinstance(x, _TorchBlockMask)


@dataclass
class MaskInfo:
    """What :func:`flex_mask` knew when it built a mask (attached to the BlockMask).

    ``padding`` is the 2-D key-padding mask over absolute key positions (``[B, >= kv_offset +
    kv_length]``, nonzero = keep: bool, or Transformers' integer mask as given) or ``None``;
    ``plain`` is true when the mask is a bare causal/sliding mask built without padding, cache
    offsets or packing, so the attention function may still add packed-document structure
    from ``position_ids``. ``docs`` is the ``[B, kv_length]`` document id of each key of a
    packed-row mask (ids ascending along the row), or ``None``.
    """

    q_offset: int | torch.Tensor
    kv_offset: int
    kv_length: int
    padding: torch.Tensor | None
    plain: bool
    docs: torch.Tensor | None = None
    _kv_positions: torch.Tensor | None = None

    def alibi_key_positions(self) -> torch.Tensor | None:
        """Key positions as Bloom/Falcon compute them for ALiBi: ``(cumsum(m) - 1) * m``, or,
        in a packed-row mask, each key's index within its document (what the model computes
        for the document on its own).

        Returns int64 ``[B, kv_length]`` for the keys of this mask, or ``None`` when there is
        no padding mask and no packing (then the position of key ``j`` is ``kv_offset + j``).
        """
        if self._kv_positions is not None:
            return self._kv_positions
        if self.padding is not None:
            m = (self.padding != 0).to(torch.long)
            pos = (m.cumsum(-1) - 1) * m
            self._kv_positions = pos[:, self.kv_offset : self.kv_offset + self.kv_length]
        elif self.docs is not None:
            d = self.docs
            idx = torch.arange(d.shape[-1], device=d.device).expand_as(d)
            starts = torch.ones_like(d, dtype=torch.bool)
            starts[:, 1:] = d[:, 1:] != d[:, :-1]
            first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
            self._kv_positions = idx - first
        return self._kv_positions


_INFO_ATTR = "_hf_flexattn_info"


def get_mask_info(block_mask: Any) -> MaskInfo | None:
    """The :class:`MaskInfo` that :func:`flex_mask` attached to ``block_mask``, if any."""
    return getattr(block_mask, _INFO_ATTR, None)


def _attach(block_mask: Any, info: MaskInfo) -> Any:
    try:
        setattr(block_mask, _INFO_ATTR, info)
    except AttributeError:  # pragma: no cover - a BlockMask class with __slots__
        logger.debug("could not attach mask info to %s", type(block_mask).__name__)
    return block_mask


def _tensor_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.is_inference():
            # no version counter to notice in-place changes (torch.inference_mode): never hit
            return ("t", id(x), object())
        return ("t", id(x), x._version, tuple(x.shape), str(x.device))
    return x


def _bounded_put(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    """Insert into an LRU-ordered dict, dropping the oldest entries beyond ``size``."""
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


def _cache_get(key: tuple) -> Any:
    # callers skip the cache in traced code: a cached mask would enter the graph as a
    # constant (stale for other offsets) and its tensors could be graph outputs
    hit = _mask_cache.get(key)
    if hit is None:
        return None
    _mask_cache.move_to_end(key)
    return hit[0]


def _cache_put(key: tuple, value: Any, refs: list) -> None:
    # `refs` keeps the keyed tensors alive so that their ids cannot be reused while cached;
    # masks built while a CUDA graph is captured live in its pool, and masks built in traced
    # code are graph values: neither is cached
    if _capturing(value.kv_num_blocks.device):
        return
    _bounded_put(_mask_cache, key, (value, refs), _CACHE_SIZE)


def clear_cache() -> None:
    """Drop all cached block masks."""
    _mask_cache.clear()


# --------------------------------------------------------------------------------------------
# recognising Transformers' mask functions
# --------------------------------------------------------------------------------------------
@dataclass
class _Structure:
    causal: bool = True
    window: int | None = None  # causal sliding window W: q - W < kv <= q
    docs: torch.Tensor | None = None  # [B, L] nondecreasing document ids (packed rows)


def _closure(fn: Callable) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    out = {}
    for name, cell in zip(code.co_freevars, cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # empty cell
            pass
    return out


def _factory_name(fn: Callable) -> str:
    mod = getattr(fn, "__module__", "") or ""
    if not mod.startswith("transformers."):
        return ""
    qual = getattr(fn, "__qualname__", "") or ""
    return qual.split(".<locals>.")[0] if ".<locals>." in qual else qual


def _flatten_and(fn: Callable, out: list[Callable]) -> bool:
    """Flatten nested ``and_masks``; False if an ``or_masks`` or odd object is inside."""
    name = _factory_name(fn)
    if name == "and_masks":
        parts = _closure(fn).get("mask_functions")
        if not isinstance(parts, tuple):
            return False
        return all(_flatten_and(p, out) for p in parts)
    if name == "or_masks":
        parts = _closure(fn).get("mask_functions")
        if isinstance(parts, tuple) and len(parts) == 1:
            return _flatten_and(parts[0], out)
        return False
    out.append(fn)
    return True


def _analyse(mask_function: Callable) -> tuple[_Structure, torch.Tensor | None] | None:
    """Parse ``mask_function`` into a known structure plus an optional padding tensor.

    Returns ``None`` when the function is not (only) built from factories we know.
    """
    atoms: list[Callable] = []
    if not _flatten_and(mask_function, atoms):
        return None
    st = _Structure(causal=False)
    padding = None
    saw_structure = False
    for atom in atoms:
        name = _factory_name(atom)
        cl = _closure(atom)
        if atom is mu.causal_mask_function:
            st.causal = True
            saw_structure = True
        elif atom is getattr(mu, "bidirectional_mask_function", None):
            saw_structure = True
        elif name == "sliding_window_overlay" and isinstance(cl.get("sliding_window"), int):
            w = cl["sliding_window"]
            st.window = w if st.window is None else min(st.window, w)
        elif name == "remap_positions_for_packed_sequence":
            inner = _analyse(cl.get("mask_function")) if callable(cl.get("mask_function")) else None
            if inner is None or inner[1] is not None or inner[0].docs is not None:
                return None
            # positions are consecutive inside a document, so the inner structure on positions
            # equals the same structure on raw indices once the rows are split into documents
            st.causal = st.causal or inner[0].causal
            if inner[0].window is not None:
                st.window = (
                    inner[0].window if st.window is None else min(st.window, inner[0].window)
                )
            saw_structure = True
        elif name == "packed_sequence_mask_function" and isinstance(
            cl.get("packed_sequence_mask"), torch.Tensor
        ):
            if st.docs is not None:
                return None
            st.docs = cl["packed_sequence_mask"]
        elif name == "padding_mask_function" and isinstance(cl.get("padding_mask"), torch.Tensor):
            p = cl["padding_mask"]
            padding = p if padding is None else None
            if padding is None:
                return None
        else:
            return None
    if not saw_structure:
        return None
    if st.window is not None and not st.causal:
        return None  # sliding overlay without causal: leave to the generic builder
    return st, padding


# --------------------------------------------------------------------------------------------
# block algebra: tile maps from positions, O(B * nQ * nKV), no host sync
# --------------------------------------------------------------------------------------------
def _bounds(n: int, block: int, length: int, offset: Any, device: torch.device):
    start = torch.arange(n, device=device, dtype=torch.long) * block
    end = torch.clamp(start + block, max=length) - 1
    return start + offset, end + offset


def _block_ranges(ids: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of a nondecreasing ``[B, L]`` tensor over each block of ``block`` columns."""
    L = ids.shape[-1]
    start = torch.arange(n, device=ids.device) * block
    end = torch.clamp(start + block, max=L) - 1
    return ids[:, start], ids[:, end]


def _padding_status(pad: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any, all)`` of ``pad [B, L]`` (bool) over each block of columns -> ``[B, n]``."""
    B, L = pad.shape
    total = n * block
    p = pad.to(torch.int32)
    if total > L:
        p = torch.nn.functional.pad(p, (0, total - L))
    counts = p.reshape(B, n, block).sum(-1)
    sizes = torch.clamp(L - torch.arange(n, device=pad.device) * block, max=block)
    return counts > 0, counts == sizes


def _to_block_mask(
    any_: torch.Tensor, all_: torch.Tensor, mask_mod: Callable, seq: tuple[int, int], block: int
) -> Any:
    """Dense block status ``[B, H, nQ, nKV]`` -> BlockMask (torch's index ordering).

    Under ``torch.no_grad()`` (generation) the q-side lists, which only the backward reads,
    are left out; the Triton backend derives them if a backward ever needs them.
    """
    partial = any_ & ~all_
    full = all_
    if torch.is_grad_enabled():
        return _block_mask_from_block_tables(
            partial, full, seq[0], seq[1], (block, block), mask_mod
        )
    kv_num, kv_idx = _dense_to_ordered(partial)
    full_num, full_idx = _dense_to_ordered(full)
    return _kv_side_block_mask(seq, kv_num, kv_idx, full_num, full_idx, block, mask_mod)


def _kv_side_block_mask(
    seq: tuple[int, int], kv_num: torch.Tensor, kv_idx: torch.Tensor, full_num: torch.Tensor,
    full_idx: torch.Tensor, block: int, mask_mod: Callable,
) -> Any:
    """A BlockMask with kv-side lists only (the q-side ones are derived if a backward ever
    needs them)."""
    return BlockMask(
        seq_lengths=seq,
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        q_num_blocks=None,
        q_indices=None,
        full_q_num_blocks=None,
        full_q_indices=None,
        BLOCK_SIZE=(block, block),
        mask_mod=mask_mod,
    )


# --------------------------------------------------------------------------------------------
# one q-tile fast path (decoding): tile ranges in Python integers, index tensors as views
# --------------------------------------------------------------------------------------------
#: Use :func:`_build_one_q_tile` where it applies (tests switch it off to compare).
_ONE_Q_TILE_FAST_PATH = True

_INDEX_BUFFERS: OrderedDict[tuple, torch.Tensor] = OrderedDict()
# per (device, n, ranges, block): the attributes of a decoding step's BlockMask but its
# lengths and mask_mod (the index tensors are views of _index_buffer); consecutive decoding
# steps mostly share them
_TILE_PROTOS: OrderedDict[tuple, dict[str, Any]] = OrderedDict()


def _index_buffer(n: int, device: torch.device) -> torch.Tensor:
    """int32 ``[0, 1, ..., n-1, 0, 1, ..., n]`` (length ``2n + 1``), cached per device and n.

    Every BlockMask tensor of :func:`_build_one_q_tile` is a view of it, so a decoding step
    launches no kernel for them: ``buf[n + c]`` holds the count ``c`` (0..n), and
    ``buf[s : s + n]`` is the index row ``s, ..., n-1, 0, ..., s-1`` -- a permutation of the n
    kv-blocks with ``s, s+1, ...`` first, the layout of :func:`_dense_to_ordered` except for the
    order of the unlisted tail, which nothing reads. A new buffer is needed only when the
    number of kv-blocks changes (every ``block`` steps). The views are shared: never write
    into BlockMask index tensors in place.
    """
    key = (device, n)
    buf = _INDEX_BUFFERS.get(key)
    if buf is None:
        buf = torch.arange(2 * n + 1, dtype=torch.int32, device=device)
        buf[n:] -= n
        if not _capturing(device):
            _bounded_put(_INDEX_BUFFERS, key, buf, 64)
    return buf


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (memory
    allocated then belongs to the graph's pool) or the code is being traced by
    torch.compile (tensors made then are graph values): either way nothing made now may
    enter a cache that later calls reuse."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _one_q_tile_ranges(
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    window: int | None,
    block: int,
    padded: bool,
) -> tuple[int, int, int, int]:
    """``(partial_start, partial_count, full_start, full_count)`` of the kv-tiles of one causal
    q-tile (``q_length <= block``), optionally windowed, in Python integers.

    Query rows sit at ``q_offset .. q_offset + q_length - 1``, key column ``j`` at ``kv_offset +
    j``; kv-tile ``j`` covers columns ``[j * block, min((j + 1) * block, kv_length))``. The tile
    status is that of :func:`_build_structured`'s block algebra: visible where some pair is
    allowed, full where every pair is and nothing is padded (``padded`` false). Partial tiles
    are visible minus full; when that is not one range (a window whose two ends both cut
    tiles), every visible tile is made partial, which only costs mask_mod evaluations.

    Tile starts are uniform, ``kv_offset + j * block``; tile ends too, ``kv_offset + (j + 1) *
    block - 1``, except the last one's, cut at ``kv_offset + kv_length - 1``. The first tile
    starting at or after ``t`` is ``clamp(ceil((t - kv_offset) / block), 0, n)``; the first one
    ending at or after ``t`` is ``clamp(ceil((t - kv_offset + 1) / block) - 1, 0, n)``, or
    ``n`` if that is the last tile and its cut end lies before ``t``. (Written out inline: this
    runs once per decoding step.)
    """
    n = -(-kv_length // block)
    q0, q1 = q_offset, q_offset + q_length - 1
    last_end = kv_offset + kv_length - 1
    hi = min(max(-((kv_offset - q1 - 1) // block), 0), n)  # visible: start <= q1
    if window is None:
        lo = 0
    else:  # visible (window): end > q0 - W
        t = q0 - window + 1
        lo = min(max(-((kv_offset - 1 - t) // block) - 1, 0), n)
        if lo == n - 1 and last_end < t:
            lo = n
    if lo >= hi:
        return 0, 0, 0, 0
    if padded:
        return lo, hi - lo, 0, 0
    t = q0 + 1  # full (causal): end <= q0
    full_hi = min(max(-((kv_offset - 1 - t) // block) - 1, 0), n)
    if full_hi == n - 1 and last_end < t:
        full_hi = n
    # full (window): start > q1 - W
    full_lo = 0 if window is None else min(max(-((kv_offset - q1 + window - 1) // block), 0), n)
    fa, fb = max(full_lo, lo), min(full_hi, hi)
    if fa >= fb:
        return lo, hi - lo, 0, 0
    if lo < fa and fb < hi:  # partial tiles on both sides of the full ones
        return lo, hi - lo, 0, 0
    if lo < fa:
        return lo, fa - lo, fa, fb - fa
    return fb, hi - fb, fa, fb - fa


def _build_one_q_tile(
    st: _Structure,
    pad: torch.Tensor | None,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    device: torch.device,
    block: int,
) -> Any:
    """:func:`_build_structured` for one q-tile of a causal (windowed) mask without documents
    and without autograd (decoding with a dynamic cache): the tile ranges come from Python
    integer arithmetic and the index tensors are views of :func:`_index_buffer` (and the offset
    one of :func:`_offset_tensor`'s bank), so a decoding step launches no kernel at all. The
    BlockMask has batch 1 (padding is left to the same mask_mod the general path attaches) and
    no q-side lists."""
    n = -(-kv_length // block)
    ps, pc, fs, fc = _one_q_tile_ranges(
        q_length, kv_length, q_offset, kv_offset, st.window, block, pad is not None
    )
    key = (device, n, ps, pc, fs, fc, block)
    # pad covers the kv_length keys; the kernels never read a captured tensor past its end
    # and the torch backend never evaluates keys past kv_length, so no copy padded to whole
    # tiles is needed (that would be one more kernel per decoding step)
    mask_mod = _structured_mask_mod(st, q_offset, kv_offset, pad, device)
    capturing = _capturing(device)
    proto = _TILE_PROTOS.get(key)
    if proto is None or capturing:
        buf = _index_buffer(n, device)
        bm = _kv_side_block_mask(
            (q_length, kv_length),
            buf.as_strided((1, 1, 1), (1, 1, 1), n + pc),
            buf.as_strided((1, 1, 1, n), (n, n, n, 1), ps),
            buf.as_strided((1, 1, 1), (1, 1, 1), n + fc),
            buf.as_strided((1, 1, 1, n), (n, n, n, 1), fs),
            block,
            mask_mod,
        )
        if not capturing:
            # what BlockMask.__init__ set, but this step's lengths and mask_mod: later steps
            # of this tile layout copy it instead of running __init__ (once per step, cold)
            proto = {k: x for k, x in vars(bm).items() if k not in ("seq_lengths", "mask_mod")}
            _bounded_put(_TILE_PROTOS, key, proto, 256)
        return bm
    bm = BlockMask.__new__(BlockMask)
    d = vars(bm)
    d.update(proto)
    d["seq_lengths"] = (q_length, kv_length)
    d["mask_mod"] = mask_mod
    return bm


_OFFSETS: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_OFFSET_BANKS: dict[torch.device, torch.Tensor] = {}
_BANK_MIN = 1 << 16


def _offset_tensor(value: int, device: torch.device) -> torch.Tensor:
    """A 0-d int64 tensor holding ``value`` (cached).

    Offsets enter mask_mods as captured tensors, not Python numbers: the Triton compiler bakes
    Python numbers into the kernel, so an int offset that changes every decoding step would
    compile a new kernel per step. Non-negative values are 0-d views of one cached
    ``arange`` per device (grown by doubling), so a new decoding step's offset costs no
    kernel launch and no host-to-device copy; the views are shared, never write into them.
    """
    key = (device, int(value))
    t = _OFFSETS.get(key)
    if t is None:
        value = int(value)
        if _capturing(device):
            # graph values, or graph-pool memory: used by this graph only, never cached
            return torch.full((), value, dtype=torch.long, device=device)
        if 0 <= value < 2**21:  # banks up to 16 MiB
            bank = _OFFSET_BANKS.get(device)
            if bank is None or bank.numel() <= value:
                n = max(_BANK_MIN, 1 << value.bit_length())
                bank = torch.arange(n, dtype=torch.long, device=device)
                _OFFSET_BANKS[device] = bank
            t = bank.as_strided((), (), value)
        else:
            # a fill kernel, not a host-to-device copy (which would wait for the GPU)
            t = torch.full((), value, dtype=torch.long, device=device)
        _bounded_put(_OFFSETS, key, t, 4096)
    return t


def _structured_mask_mod(
    st: _Structure, q_offset: Any, kv_offset: int, pad: torch.Tensor | None,
    device: torch.device | None = None,
) -> Callable:
    """Exact element-wise mask for partial tiles (indices are local, offsets added here).

    Only ``q - kv`` matters for causal and window terms, so both offsets fold into one
    captured 0-d tensor ``shift = q_offset - kv_offset``. ``pad`` ``[B, >= kv_length]`` over
    local keys keeps the nonzero entries (bool, or Transformers' integer mask as it comes).
    Every mask of one ``(causal, window, docs?, pad?)`` shape is one mod family
    (``_mod_eval.freeze_family``): a new decoding step's mask reuses the compiled kernel
    without a walk over its closure.
    """
    causal, window, docs = st.causal, st.window, st.docs
    if isinstance(q_offset, torch.Tensor):
        shift = q_offset - kv_offset
    else:
        shift = _offset_tensor(int(q_offset) - int(kv_offset), device or torch.device("cpu"))

    def flex_structured_mask(b, h, q_idx, kv_idx):
        q = q_idx + shift
        kv = kv_idx
        ok = kv <= q if causal else q_idx >= 0
        if window is not None:
            ok = ok & (kv > q - window)
        if docs is not None:
            ok = ok & (docs[b, q_idx] == docs[b, kv_idx])
        if pad is not None:
            ok = ok & (pad[b, kv_idx] != 0)
        return ok

    token = ("hf_flexattn.structured", causal, window, docs is not None, pad is not None)
    if docs is None:
        captures = (shift,) if pad is None else (shift, pad)
    else:
        captures = (shift, docs) if pad is None else (shift, docs, pad)
    return freeze_family(flex_structured_mask, token, captures)


def _build_structured(
    st: _Structure,
    pad: torch.Tensor | None,
    B: int,
    q_length: int,
    kv_length: int,
    q_offset: Any,
    kv_offset: int,
    device: torch.device,
    block: int,
) -> Any:
    """Tile map of ``structure & padding``; ``pad`` is ``[B, kv_length]`` bool (local keys).

    Decoding steps (one q-tile, causal, no documents, int ``q_offset``, no autograd) take
    :func:`_build_one_q_tile`, which launches no kernel for the tile map.
    """
    if (
        _ONE_Q_TILE_FAST_PATH
        and q_length <= block
        and st.docs is None
        and st.causal
        and type(q_offset) is int
        and type(kv_offset) is int
        and not torch.is_grad_enabled()
    ):
        return _build_one_q_tile(st, pad, q_length, kv_length, q_offset, kv_offset, device, block)
    nq, nkv = -(-q_length // block), -(-kv_length // block)
    q0, q1 = _bounds(nq, block, q_length, q_offset, device)
    k0, k1 = _bounds(nkv, block, kv_length, kv_offset, device)
    q0, q1 = q0[:, None], q1[:, None]
    k0, k1 = k0[None, :], k1[None, :]
    if st.causal:
        any_ = k0 <= q1
        all_ = k1 <= q0
    else:
        any_ = torch.ones(nq, nkv, dtype=torch.bool, device=device)
        all_ = any_
    if st.window is not None:
        any_ = any_ & (k1 > q0 - st.window)
        all_ = all_ & (k0 > q1 - st.window)
    any_, all_ = any_[None, None], all_[None, None]  # [1, 1, nQ, nKV]
    if st.docs is not None:
        dq0, dq1 = _block_ranges(st.docs, nq, block)
        dk0, dk1 = _block_ranges(st.docs, nkv, block)
        d_any = (dq0[:, :, None] <= dk1[:, None, :]) & (dk0[:, None, :] <= dq1[:, :, None])
        d_all = (
            (dq0 == dq1)[:, :, None]
            & (dk0 == dk1)[:, None, :]
            & (dq0[:, :, None] == dk0[:, None, :])
        )
        any_ = any_ & d_any[:, None]
        all_ = all_ & d_all[:, None]
    if pad is not None:
        p_any, p_all = _padding_status(pad, nkv, block)
        any_ = any_ & p_any[:, None, None, :]
        all_ = all_ & p_all[:, None, None, :]
    # tensors read by the mask_mod cover whole tiles, so ragged edge tiles never index past them
    pad_t = None if pad is None else torch.nn.functional.pad(pad, (0, nkv * block - kv_length))
    st_t = st
    if st.docs is not None:
        n = max(nq, nkv) * block
        docs_t = torch.nn.functional.pad(st.docs, (0, n - st.docs.shape[-1]), value=-1)
        st_t = _Structure(causal=st.causal, window=st.window, docs=docs_t)
    mask_mod = _structured_mask_mod(st_t, q_offset, kv_offset, pad_t, device)
    return _to_block_mask(any_, all_, mask_mod, (q_length, kv_length), block)


def _build_generic(
    mask_function: Callable,
    pad: torch.Tensor | None,
    B: int,
    q_length: int,
    kv_length: int,
    q_offset: Any,
    kv_offset: int,
    device: torch.device,
    block: int,
) -> Any:
    if not isinstance(q_offset, torch.Tensor):  # runtime values, not kernel constants
        q_offset = _offset_tensor(int(q_offset), device)
    kv_off = _offset_tensor(int(kv_offset), device)

    def flex_generic_mask(b, h, q_idx, kv_idx):
        ok = mask_function(b, h, q_idx + q_offset, kv_idx + kv_off)
        if pad is not None:
            ok = ok & pad[b, kv_idx]
        return ok

    return create_block_mask(
        flex_generic_mask, B, None, q_length, kv_length, device=device, BLOCK_SIZE=block
    )


_ANALYSED: OrderedDict[int, tuple] = OrderedDict()


def _analyse_cached(
    fn: Callable, copy: bool = True
) -> tuple[_Structure, torch.Tensor | None] | None:
    """:func:`_analyse`, remembered for plain functions without a closure (Transformers'
    ``causal_mask_function``, which every decoding step passes); a fresh structure each time
    (callers may change it) unless ``copy`` is false (the caller only reads it)."""
    if getattr(fn, "__closure__", True) is not None:
        return _analyse(fn)
    hit = _ANALYSED.get(id(fn))
    if hit is None or hit[0] is not fn:
        hit = (fn, _analyse(fn))
        _bounded_put(_ANALYSED, id(fn), hit, 64)
    res = hit[1]
    if res is None:
        return None
    st = res[0]
    if not copy:
        return res
    return _Structure(causal=st.causal, window=st.window, docs=st.docs), res[1]


def _padding_as_given(attention_mask: torch.Tensor, device: torch.device, need: int) -> bool:
    """Whether the 2-D padding mask can be read as it is (the mask_mod keeps nonzero
    entries): on ``device``, covering ``need`` key positions, not floating point. Then no
    conversion or padding kernel runs, which matters once per decoding step."""
    return (
        attention_mask.device == device
        and attention_mask.shape[-1] >= need
        and not attention_mask.dtype.is_floating_point
    )


def _one_q_tile_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    mask_function: Callable,
    attention_mask: torch.Tensor | None,
    device: torch.device,
    block: int,
) -> Any:
    """A decoding step's mask (one q tile, int offsets, no autograd) for a causal, possibly
    windowed, ``mask_function`` without packed documents, with no device work and no cache
    (each step has new lengths); ``None`` where the general path of :func:`flex_mask` is
    needed (other structures, a padding mask to convert or pad)."""
    parsed = _analyse_cached(mask_function, copy=False)  # read only
    if parsed is None or parsed[1] is not None:
        return None
    st = parsed[0]
    if st.docs is not None or not st.causal:
        return None
    pad = None
    if attention_mask is not None:
        if not _padding_as_given(attention_mask, device, kv_offset + kv_length):
            return None
        if kv_offset == 0 and attention_mask.shape[1] == kv_length:
            pad = attention_mask  # a dynamic cache's step: the mask is exactly the keys
        else:
            pad = attention_mask[:, kv_offset : kv_offset + kv_length]
        if pad.shape[0] != batch_size:
            pad = pad.expand(batch_size, -1)
    bm = _build_one_q_tile(st, pad, q_length, kv_length, q_offset, kv_offset, device, block)
    plain = attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    info = MaskInfo(q_offset, kv_offset, kv_length, attention_mask, plain)
    _attach(bm, info)
    return bm


# --------------------------------------------------------------------------------------------
# the mask function
# --------------------------------------------------------------------------------------------
def flex_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> Any:
    """Transformers mask arguments -> :class:`~hf_flexattn.block_mask.BlockMask`.

    Args:
        batch_size, q_length, kv_length: sizes of the attention call the mask is for.
        q_offset: absolute position of query row 0 (int, or 0-d tensor for static caches).
        kv_offset: absolute position of key column 0.
        mask_function: Transformers' ``(b, h, q_pos, kv_pos) -> bool`` on absolute positions;
            ``None`` means causal.
        attention_mask: 2-D padding mask ``[B, >= ...]`` over absolute key positions
            (1/True = keep), or ``None``.
        local_size, allow_is_causal_skip, **kwargs: accepted and ignored (sdpa/eager only).

    Returns:
        A BlockMask for ``(q_length, kv_length)`` with ``B = batch_size`` (or 1 when nothing
        depends on the batch) and ``H = 1``. Never ``None``: flex needs the mask.
    """
    if mask_function is None:
        mask_function = mu.causal_mask_function
    if not callable(mask_function):
        raise TypeError(f"mask_function must be callable, got {type(mask_function).__name__}.")
    if not (
        type(batch_size) is int and type(q_length) is int and type(kv_length) is int
        and batch_size > 0 and q_length > 0 and kv_length > 0
    ):  # the fast check first: this runs once per decoding step
        for name, v in (
            ("batch_size", batch_size), ("q_length", q_length), ("kv_length", kv_length)
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if isinstance(kv_offset, torch.Tensor):
        kv_offset = int(kv_offset)
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
    ):
        got = (
            tuple(attention_mask.shape)
            if isinstance(attention_mask, torch.Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(f"attention_mask must be a 2-D padding mask [B, S] or None, got {got}.")
    if device is None:
        device = attention_mask.device if attention_mask is not None else torch.device("cpu")
    if type(device) is not torch.device:
        device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # cached buffers are keyed by device: "cuda" alone would follow the current device
        device = torch.device("cuda", torch.cuda.current_device())
    if isinstance(q_offset, torch.Tensor):
        q_offset = q_offset.to(device=device, dtype=torch.long).reshape(())
    block = int(BLOCK_SIZE)
    if (
        _ONE_Q_TILE_FAST_PATH
        and q_length <= block
        and type(q_offset) is int
        and not torch.is_grad_enabled()
    ):
        bm = _one_q_tile_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
            device, block,
        )
        if bm is not None:
            return bm

    key = None
    if not torch.compiler.is_compiling():  # traced code keeps out of the cache
        key = (
            "mask",
            batch_size,
            q_length,
            kv_length,
            _tensor_key(q_offset),
            kv_offset,
            _tensor_key(attention_mask),
            id(mask_function),
            str(device),
            block,
        )
        refs = [mask_function, attention_mask, q_offset]
        hit = _cache_get(key)
        if hit is not None:
            return hit

    full_pad = None
    pad = None
    if attention_mask is not None:
        need = kv_offset + kv_length
        if _padding_as_given(attention_mask, device, need):
            full_pad = attention_mask
        else:
            full_pad = attention_mask.to(device=device, dtype=torch.bool)
            if full_pad.shape[-1] < need:
                full_pad = torch.nn.functional.pad(full_pad, (0, need - full_pad.shape[-1]))
        pad = full_pad[:, kv_offset : kv_offset + kv_length]
        if pad.shape[0] != batch_size:
            pad = pad.expand(batch_size, -1)

    parsed = _analyse(mask_function)
    if parsed is not None and parsed[1] is not None:
        # a padding function inside mask_function (older call paths): use it as our padding
        extra = parsed[1].to(device=device, dtype=torch.bool)
        need = kv_offset + kv_length
        if extra.shape[-1] < need:
            extra = torch.nn.functional.pad(extra, (0, need - extra.shape[-1]))
        extra = extra[:, kv_offset : kv_offset + kv_length]
        pad = extra if pad is None else pad & extra
    if parsed is not None and parsed[0].docs is not None:
        docs = parsed[0].docs
        if (
            docs.shape[-1] != q_length
            or q_length != kv_length
            or not (isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0)
        ):
            parsed = None  # packed rows with a cache: not the training layout, go generic
        elif docs.shape[0] != batch_size:
            parsed[0].docs = docs.expand(batch_size, -1)
    if parsed is not None:
        st = parsed[0]
        bm = _build_structured(
            st, pad, batch_size, q_length, kv_length, q_offset, kv_offset, device, block
        )
    else:
        logger.debug(
            "mask_function %r not recognised: generic tiled build",
            getattr(mask_function, "__qualname__", mask_function),
        )
        bm = _build_generic(
            mask_function, pad, batch_size, q_length, kv_length, q_offset, kv_offset, device, block
        )
    plain = (
        parsed is not None
        and parsed[0].docs is None
        and parsed[0].causal
        and attention_mask is None
        and isinstance(q_offset, int)
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
    )
    _attach(
        bm,
        MaskInfo(
            q_offset=q_offset,
            kv_offset=kv_offset,
            kv_length=kv_length,
            padding=full_pad,
            plain=plain,
            docs=None if parsed is None else parsed[0].docs,
        ),
    )
    if key is not None:
        _cache_put(key, bm, refs)
    return bm


# --------------------------------------------------------------------------------------------
# packed documents inside the attention function
# --------------------------------------------------------------------------------------------
def _docs_from_cu_seqlens(cu: torch.Tensor, length: int) -> torch.Tensor:
    pos = torch.arange(length, device=cu.device)
    return torch.bucketize(pos, cu.to(torch.long)[1:], right=True)[None]


def _docs_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    p = position_ids.to(torch.long)
    diff = torch.diff(p, dim=-1, prepend=p[:, :1] - 1)
    return (diff != 1).cumsum(-1)


def _document_mask(
    source: torch.Tensor,
    kind: str,
    batch: int,
    length: int,
    window: int | None,
    device: torch.device,
) -> Any:
    block = int(BLOCK_SIZE)
    key = None
    if not torch.compiler.is_compiling():  # traced code keeps out of the cache
        key = ("docs", kind, _tensor_key(source), batch, length, window, str(device), block)
        hit = _cache_get(key)
        if hit is not None:
            return hit
    if kind == "cu":
        docs = _docs_from_cu_seqlens(source.to(device), length)
    else:
        docs = _docs_from_position_ids(source.to(device))
    if docs.shape[0] != batch:
        docs = docs.expand(batch, -1)
    st = _Structure(causal=True, window=window, docs=docs)
    bm = _build_structured(st, None, batch, length, length, 0, 0, device, block)
    _attach(bm, MaskInfo(q_offset=0, kv_offset=0, kv_length=length, padding=None, plain=False,
                         docs=docs))
    if key is not None:
        _cache_put(key, bm, [source])
    return bm


# --------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------
def _dense_mask_score_mod(mask: torch.Tensor) -> Callable:
    """A user-supplied 4-D mask (bool keep-mask or additive float) as a score_mod."""
    per_head = mask.shape[1] != 1

    if mask.dtype == torch.bool:

        def dense_bool_mask(score, b, h, q_idx, kv_idx):
            keep = mask[b, h if per_head else 0, q_idx, kv_idx]
            return torch.where(keep, score, -float("inf"))

        return freeze(dense_bool_mask)

    def dense_additive_mask(score, b, h, q_idx, kv_idx):
        return score + mask[b, h if per_head else 0, q_idx, kv_idx]

    return freeze(dense_additive_mask)


_COMPOSED: OrderedDict[tuple, tuple[Callable, tuple]] = OrderedDict()
_SOFTCAPS: OrderedDict[float, Callable] = OrderedDict()


def _softcap_mod(cap: float) -> Callable:
    """``mods.softcap(cap)``, one object per value: the same mod object on every call lets
    the Triton backend find its prepared kernel (and decode plan) by identity."""
    fn = _SOFTCAPS.get(cap)
    if fn is None:
        from hf_flexattn import mods

        fn = mods.softcap(cap)
        _bounded_put(_SOFTCAPS, cap, fn, 64)
    return fn


def _compose(mods_list: list[Callable]) -> Callable | None:
    if not mods_list:
        return None
    if len(mods_list) == 1:
        return mods_list[0]
    key = tuple(id(m) for m in mods_list)
    hit = _COMPOSED.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[1], mods_list)):
        return hit[0]
    from hf_flexattn import mods

    fn = mods.compose_score_mods(*mods_list)
    # the entry keeps the parts alive, so their ids stay theirs
    _bounded_put(_COMPOSED, key, (fn, tuple(mods_list)), 64)
    return fn


def run_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: Any,
    score_mods: list[Callable],
    scale: float | None,
    s_aux: torch.Tensor | None = None,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Call :func:`hf_flexattn.flex_attention` and fold attention sinks in.

    ``s_aux [Hq]`` (gpt-oss sinks) adds one logit per head to the softmax normaliser:
    ``out * exp(lse - logaddexp(lse, s_aux[h]))``, differentiable in ``s_aux``.
    Returns ``[B, Hq, Lq, Dv]``.
    """
    gqa = query.shape[1] != key.shape[1]
    score_mod = _compose(score_mods)
    if s_aux is None:
        return _flex_attention(
            query,
            key,
            value,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=gqa,
            kernel_options=kernel_options,
        )
    Hq = query.shape[1]
    if not isinstance(s_aux, torch.Tensor) or s_aux.numel() != Hq:
        got = tuple(s_aux.shape) if isinstance(s_aux, torch.Tensor) else type(s_aux).__name__
        raise ValueError(
            f"s_aux must be a tensor with one sink logit per query head ({Hq}), got {got}."
        )
    out, lse = _flex_attention(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=gqa,
        return_lse=True,
        kernel_options=kernel_options,
    )
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    sink = s_aux.reshape(1, Hq, 1).to(acc)
    lse = lse.to(acc)
    factor = torch.exp(lse - torch.logaddexp(lse, sink))
    return (out * factor.unsqueeze(-1).to(out.dtype)).to(query.dtype)


_CU_CHECKED: OrderedDict[tuple, tuple] = OrderedDict()


def _cu_differ(cu_q: torch.Tensor, cu_k: torch.Tensor) -> bool:
    """Whether two ``cu_seq_lens`` tensors differ; the value comparison (a device sync on
    CUDA) runs once per pair of tensors, not once per layer."""
    if cu_q.shape != cu_k.shape:
        return True
    if torch.compiler.is_compiling():
        return not torch.equal(cu_q, cu_k)  # traced: no Python-side cache
    key = (_tensor_key(cu_q), _tensor_key(cu_k))
    hit = _CU_CHECKED.get(key)
    if hit is not None and hit[0] is cu_q and hit[1] is cu_k:  # same live tensors
        return hit[2]
    differ = not torch.equal(cu_q, cu_k)
    _bounded_put(_CU_CHECKED, key, (cu_q, cu_k, differ), 64)
    return differ


def select_mask(
    attention_mask: Any,
    batch: int,
    q_length: int,
    kv_length: int,
    device: torch.device,
    sliding_window: int | None,
    causal: bool,
    kwargs: dict[str, Any],
) -> tuple[Any, list[Callable]]:
    """Pick the BlockMask (and score_mods for dense user masks) for one attention call.

    Packed rows take precedence: ``cu_seq_lens_q`` (batch 1), else ``position_ids`` that
    restart when the incoming mask is a plain causal/sliding one (or absent) and ``q_length ==
    kv_length > 1``. Documents are built analytically from offsets, with ``sliding_window``.
    """
    B, Lq, Lk = batch, q_length, kv_length
    score_mods: list[Callable] = []
    block_mask = None
    if _is_block_mask(attention_mask):
        block_mask = attention_mask
    elif isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() != 4:
            raise ValueError(
                "attention_mask must be a BlockMask, a 4-D mask or None, got a "
                f"tensor of shape {tuple(attention_mask.shape)}."
            )
        score_mods.append(_dense_mask_score_mod(attention_mask[..., :Lq, :Lk]))
    elif attention_mask is not None:
        raise TypeError(
            "attention_mask must be a BlockMask, a 4-D tensor or None, got "
            f"{type(attention_mask).__name__}."
        )

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    if isinstance(cu_q, torch.Tensor) and Lq == Lk and causal:
        if cu_k is not None and cu_k is not cu_q and _cu_differ(cu_q, cu_k):
            raise ValueError(
                "cu_seq_lens_q and cu_seq_lens_k differ; only self-attention over "
                "packed rows is supported."
            )
        if B != 1:
            raise ValueError(f"cu_seq_lens_q describes packed rows of a batch of 1, got batch {B}.")
        return _document_mask(cu_q, "cu", B, Lq, sliding_window, device), []
    if (
        isinstance(position_ids, torch.Tensor)
        and Lq == Lk
        and Lq > 1
        and causal
        and (
            attention_mask is None
            or (block_mask is not None and getattr(get_mask_info(block_mask), "plain", False))
        )
    ):
        pid = position_ids if position_ids.dim() == 2 else position_ids.reshape(1, -1)
        if pid.shape[-1] == Lq:
            return _document_mask(pid, "pos", B, Lq, sliding_window, device), score_mods
    if attention_mask is None and causal and Lq > 1:
        # no mask at all: causal (bottom-right aligned) with the layer's window
        st = _Structure(causal=True, window=sliding_window)
        block_mask = _build_structured(st, None, B, Lq, Lk, Lk - Lq, 0, device, int(BLOCK_SIZE))
    return block_mask, score_mods


def flex_attention_forward(
    module: torch.nn.Module | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention-interface entry point for Transformers models.

    Args:
        module: the calling attention module (``module.training`` is consulted for dropout).
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D/Dv]``; GQA heads are not
            repeated (``Hq`` a multiple of ``Hkv``, any ratio).
        attention_mask: the BlockMask from :func:`flex_mask`, a user 4-D mask, or ``None``.
        scaling: softmax scale (default ``1/sqrt(D)``).
        dropout: must be 0 while training (attention dropout is not supported).
        sliding_window: ``W`` (``q - W < kv <= q``); used when this function builds the mask
            itself (packed documents, no mask); a BlockMask from :func:`flex_mask` already has it.
        softcap: Gemma-2 logit soft-capping ``cap * tanh(score / cap)``.
        s_aux: gpt-oss attention sinks ``[Hq]``.
        **kwargs: ``cu_seq_lens_q``/``cu_seq_lens_k`` (packed rows, flash-attention style),
            ``position_ids`` (packed rows restarting at 0), ``kernel_options``; others ignored.

    Returns:
        ``(out [B, Lq, Hq, Dv] contiguous, None)``; inside ``torch.autocast`` in the
        autocast dtype (q, k and v are cast to it first, as for SDPA).
    """
    query, key, value, autocast_device = autocast_inputs(query, key, value)
    if autocast_device is not None:
        with torch.autocast(autocast_device, enabled=False):
            return flex_attention_forward(
                module, query, key, value, attention_mask, scaling, dropout, sliding_window,
                softcap, s_aux, **kwargs,
            )
    training = module is None or bool(getattr(module, "training", False))
    if (
        s_aux is None
        and query.shape[2] != key.shape[2]
        and "kernel_options" not in kwargs
        and not (dropout and training)
    ):
        # a decoding step: a plan stored on this mask by an earlier layer's call, or made
        # from the template of the last step's (see triton_backend.run_plan). With a cache
        # (Lq != Lk) the mask is used as given: no packing, no mask of our own
        sm = None if softcap is None else _softcap_mod(float(softcap))
        res = _tb.run_plan(query, key, value, sm, attention_mask, scaling, True, None, False,
                           True)
        if res is not None:
            out = res[0]  # [B, Lq, Hq, Dv], contiguous unless q's memory order was unusual
            return (out if out.is_contiguous() else out.contiguous()), None
    if dropout and dropout > 0 and training:
        raise ValueError(
            f"attention dropout is not supported by the 'flex' attention implementation (got "
            f"dropout={dropout} while training); set the model's attention dropout to 0 "
            "(e.g. config.attention_dropout = 0.0) or call model.eval()."
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L, D], got {got}.")
    B, Hq, Lq, _ = query.shape
    Lk = key.shape[-2]
    device = query.device
    if sliding_window is not None and (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, int)
        or sliding_window < 1
    ):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}.")

    causal = bool(getattr(module, "is_causal", True)) if module is not None else True
    block_mask, score_mods = select_mask(
        attention_mask, B, Lq, Lk, device, sliding_window, causal, kwargs
    )
    if softcap is not None:
        score_mods.insert(0, _softcap_mod(float(softcap)))
    kernel_options = kwargs.get("kernel_options")
    if not isinstance(kernel_options, dict):
        kernel_options = None
    if scaling is not None:
        scaling = float(scaling)
        if not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got {scaling}.")
    out = run_flex(query, key, value, block_mask, score_mods, scaling, s_aux, kernel_options)
    return out.transpose(1, 2).contiguous(), None
