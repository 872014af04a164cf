"""Ready-made ``mask_mod`` / ``score_mod`` functions and the helpers that feed them.

Every mod here follows torch's FlexAttention semantics: it is written for one position at a
time (``b``, ``h``, ``q_idx``, ``kv_idx`` are 0-d integer tensors, ``score`` a 0-d float, as
if under ``torch.vmap``).  The bodies are plain elementwise expressions and index captured
tensors down to scalars (``doc[q_idx]``, ``slopes[h]``), so they give the same result when
evaluated on broadcast index tiles and can be traced into Triton kernels.  Nothing branches on
tensor values.

Factories return functions that name themselves (``sliding_window_128``, ``softcap_30``),
which keeps reprs, logs and kernel dumps readable.

Conventions:

* ``sliding_window(W)`` follows Transformers: key ``j`` is visible from query ``i`` iff
  ``i - W < j <= i`` (``W`` keys including the query's own).
* Document ids are integers per token; ``-1`` (any negative id) marks padding, which neither
  attends nor is attended to.
* ``offset`` shifts query positions: query ``q_idx`` sits at absolute position
  ``q_idx + offset`` (decode: ``offset = kv_len - q_len``).

Run ``python -m hf_flexattn.mods`` to draw every mask of the library as text.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._mod_eval import freeze, is_frozen

__all__ = [
    "alibi",
    "alibi_slopes_bloom",
    "alibi_slopes_falcon",
    "alibi_slopes_mpt",
    "causal",
    "causal_mask",
    "chunked",
    "compose_score_mods",
    "document_ids_from_offsets",
    "document_ids_from_position_ids",
    "document_mask",
    "documents_from_offsets",
    "documents_from_position_ids",
    "key_padding",
    "main",
    "prefix_lm",
    "relative_position_bias",
    "render_mask",
    "sliding_window",
    "softcap",
]

logger = logging.getLogger(__name__)

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# argument checks (all run before anything is computed)
# --------------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_arg(fn: str, name: str, x: Any, *, minimum: int | None = None) -> int:
    if not _is_int(x):
        raise TypeError(f"{fn}: {name} must be an int, got {type(x).__name__} ({x!r}).")
    if minimum is not None and x < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{fn}: {name} must be {what}, got {x}.")
    return x


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"{type(t).__name__} ({t!r})"


def _tensor_arg(
    fn: str, name: str, t: Any, ndims: tuple[int, ...], kind: str, shape: str
) -> Tensor:
    """Check type, rank and dtype kind (``"int"``, ``"float"`` or ``"any"``) of a tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{fn}: {name} must be a torch.Tensor of shape {shape}, got {_describe(t)}."
        )
    if t.dim() not in ndims:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {_describe(t)}.")
    if kind == "int" and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{fn}: {name} must have an integer dtype, got {_describe(t)}.")
    if kind == "float" and not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must have a floating-point dtype, got {_describe(t)}.")
    if kind == "any" and t.dtype.is_complex:
        raise TypeError(f"{fn}: {name} must be bool, integer or float, got {_describe(t)}.")
    return t


def _named(fn: Callable, name: str, frozen: bool = True) -> Callable:
    """Name ``fn``; ``frozen`` marks its closure as immutable (see ``_mod_eval.freeze``)."""
    fn.__name__ = name
    fn.__qualname__ = name
    return freeze(fn) if frozen else fn


def _offset_suffix(offset: int) -> str:
    return f"_offset_{offset}" if offset else ""


# --------------------------------------------------------------------------------------------
# mask mods
# --------------------------------------------------------------------------------------------
@freeze
def causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Causal attention: query ``q_idx`` sees keys ``kv_idx <= q_idx``."""
    return q_idx >= kv_idx


def causal(offset: int = 0) -> MaskMod:
    """Causal mask with queries shifted by ``offset`` (``q_idx + offset >= kv_idx``).

    For decode / chunked prefill against a cache use ``offset = kv_len - q_len`` so the
    last query sees every key.  Named ``causal`` (offset 0) or ``causal_offset_{offset}``.
    """
    offset = _int_arg("causal", "offset", offset)
    if offset == 0:

        def causal_(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return q_idx >= kv_idx

        return _named(causal_, "causal")

    def causal_offset(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx + offset >= kv_idx

    return _named(causal_offset, f"causal_offset_{offset}")


def sliding_window(window: int, *, causal: bool = True, offset: int = 0) -> MaskMod:
    """Sliding-window mask of ``window`` keys (Transformers' convention).

    With ``i = q_idx + offset``: causal (default) key ``j`` is visible iff
    ``i - window < j <= i`` (named ``sliding_window_{window}``); ``causal=False`` gives the
    symmetric band ``|i - j| < window`` (named ``bidirectional_window_{window}``).  A non-zero
    offset adds ``_offset_{offset}`` to the name.
    """
    window = _int_arg("sliding_window", "window", window, minimum=1)
    offset = _int_arg("sliding_window", "offset", offset)
    if not isinstance(causal, bool):
        raise TypeError(f"sliding_window: causal must be a bool, got {_describe(causal)}.")
    suffix = _offset_suffix(offset)
    if causal:

        def sliding_window_(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            dist = q_idx + offset - kv_idx
            return (dist >= 0) & (dist < window)

        return _named(sliding_window_, f"sliding_window_{window}{suffix}")

    def bidirectional_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        dist = q_idx + offset - kv_idx
        return (dist < window) & (dist > -window)

    return _named(bidirectional_window, f"bidirectional_window_{window}{suffix}")


def chunked(chunk_size: int, *, causal: bool = True) -> MaskMod:
    """Attention inside fixed chunks of ``chunk_size`` tokens (Llama-4 style).

    ``q_idx // chunk_size == kv_idx // chunk_size``, and causal unless ``causal=False``.
    Named ``chunked_{chunk_size}`` (``bidirectional_chunked_{chunk_size}`` when not causal).
    """
    chunk_size = _int_arg("chunked", "chunk_size", chunk_size, minimum=1)
    if not isinstance(causal, bool):
        raise TypeError(f"chunked: causal must be a bool, got {_describe(causal)}.")
    if causal:

        def chunked_(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (q_idx // chunk_size == kv_idx // chunk_size) & (q_idx >= kv_idx)

        return _named(chunked_, f"chunked_{chunk_size}")

    def bidirectional_chunked(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx // chunk_size == kv_idx // chunk_size

    return _named(bidirectional_chunked, f"bidirectional_chunked_{chunk_size}")


def document_mask(document_ids: Tensor, *, causal: bool = False) -> MaskMod:
    """Tokens attend only within their own document.

    ``document_ids``: integer ``[S]`` (shared by the batch) or ``[B, S]`` (indexed with
    ``b``), one id per token of the (self-attention) sequence; a negative id (``-1``) marks
    padding, which neither attends nor is attended to.  ``causal=True`` also applies
    ``q_idx >= kv_idx``.  Named ``document`` / ``causal_document``.
    """
    ids = _tensor_arg("document_mask", "document_ids", document_ids, (1, 2), "int", "[S] or [B, S]")
    if not isinstance(causal, bool):
        raise TypeError(f"document_mask: causal must be a bool, got {_describe(causal)}.")
    if ids.dim() == 1:
        if causal:

            def causal_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                dq = ids[q_idx]
                return (dq == ids[kv_idx]) & (dq >= 0) & (q_idx >= kv_idx)

            return _named(causal_document, "causal_document")

        def document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            dq = ids[q_idx]
            return (dq == ids[kv_idx]) & (dq >= 0)

        return _named(document, "document")

    if causal:

        def causal_document_b(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            dq = ids[b, q_idx]
            return (dq == ids[b, kv_idx]) & (dq >= 0) & (q_idx >= kv_idx)

        return _named(causal_document_b, "causal_document")

    def document_b(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        dq = ids[b, q_idx]
        return (dq == ids[b, kv_idx]) & (dq >= 0)

    return _named(document_b, "document")


def document_ids_from_offsets(offsets: Tensor | Sequence[int], total_len: int) -> Tensor:
    """Per-token document ids ``[total_len]`` (int64) from ``cu_seqlens``-style offsets.

    ``offsets``: ``[n_docs + 1]`` non-decreasing integers starting at 0 (document ``d`` is
    tokens ``offsets[d] <= t < offsets[d + 1]``; empty documents are allowed).  Tokens at or
    past ``offsets[-1]`` (trailing padding) get id ``-1``.  The result is on ``offsets``' device.
    """
    fn = "document_ids_from_offsets"
    if not isinstance(offsets, Tensor):
        if not isinstance(offsets, Sequence) or not all(_is_int(o) for o in offsets):
            raise TypeError(
                f"{fn}: offsets must be a 1-D integer tensor or a sequence of ints, "
                f"got {_describe(offsets)}."
            )
        offsets = torch.tensor(list(offsets), dtype=torch.long)
    off = _tensor_arg(fn, "offsets", offsets, (1,), "int", "[n_docs + 1]")
    total_len = _int_arg(fn, "total_len", total_len, minimum=0)
    if off.numel() == 0:
        raise ValueError(f"{fn}: offsets must hold at least one entry (0), got an empty tensor.")
    off = off.to(torch.long)
    if int(off[0]) != 0:
        raise ValueError(f"{fn}: offsets must start at 0, got offsets[0] = {int(off[0])}.")
    if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
        raise ValueError(f"{fn}: offsets must be non-decreasing, got {off.tolist()}.")
    if int(off[-1]) > total_len:
        raise ValueError(f"{fn}: offsets[-1] = {int(off[-1])} exceeds total_len = {total_len}.")
    pos = torch.arange(total_len, device=off.device)
    ids = torch.searchsorted(off, pos, right=True) - 1
    return torch.where(pos < off[-1], ids, torch.full_like(ids, -1))


def document_ids_from_position_ids(position_ids: Tensor) -> Tensor:
    """Document ids (int64, same shape) from packed ``position_ids`` ``[S]`` or ``[B, S]``.

    A new document starts at the first token and wherever the position restarts:
    ``position_ids[t] == 0`` or ``position_ids[t] != position_ids[t - 1] + 1``.  Ids count
    from 0 in every row.
    """
    fn = "document_ids_from_position_ids"
    pid = _tensor_arg(fn, "position_ids", position_ids, (1, 2), "int", "[S] or [B, S]")
    pid = pid.to(torch.long)
    starts = torch.ones_like(pid, dtype=torch.bool)
    if pid.shape[-1] > 1:
        cur, prev = pid[..., 1:], pid[..., :-1]
        starts[..., 1:] = (cur == 0) | (cur != prev + 1)
    return torch.cumsum(starts.to(torch.long), dim=-1) - 1


def documents_from_offsets(
    offsets: Tensor | Sequence[int], total_len: int, *, causal: bool = True
) -> MaskMod:
    """:func:`document_mask` over ``document_ids_from_offsets(offsets, total_len)``."""
    return document_mask(document_ids_from_offsets(offsets, total_len), causal=causal)


def documents_from_position_ids(position_ids: Tensor, *, causal: bool = True) -> MaskMod:
    """:func:`document_mask` over ``document_ids_from_position_ids(position_ids)``."""
    return document_mask(document_ids_from_position_ids(position_ids), causal=causal)


def prefix_lm(prefix_lengths: Tensor | int) -> MaskMod:
    """Prefix-LM: keys in the prefix are visible to every query, the rest is causal.

    ``prefix_lengths``: an int (same prefix for the whole batch) or an integer tensor ``[B]``
    (indexed with ``b``).  Allowed iff ``kv_idx < prefix[b]`` or ``q_idx >= kv_idx``.
    """
    fn = "prefix_lm"
    if _is_int(prefix_lengths):
        n = _int_arg(fn, "prefix_lengths", prefix_lengths, minimum=0)

        def prefix_lm_(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx < n) | (q_idx >= kv_idx)

        return _named(prefix_lm_, "prefix_lm")
    lengths = _tensor_arg(fn, "prefix_lengths", prefix_lengths, (1,), "int", "[B] (or an int)")

    def prefix_lm_b(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < lengths[b]) | (q_idx >= kv_idx)

    return _named(prefix_lm_b, "prefix_lm")


def key_padding(lengths: Tensor | None = None, *, attention_mask: Tensor | None = None) -> MaskMod:
    """Hide padded keys.  Give exactly one of:

    * ``lengths``: integer ``[B]``, the number of real (left-aligned) keys per row:
      allowed iff ``kv_idx < lengths[b]``;
    * ``attention_mask``: ``[B, S]`` (bool, int or float; non-zero = real token):
      allowed iff ``attention_mask[b, kv_idx]`` is truthy.  ``S`` must cover every key index.
    """
    fn = "key_padding"
    if (lengths is None) == (attention_mask is None):
        raise ValueError(
            f"{fn}: give exactly one of lengths [B] or attention_mask [B, S], got "
            f"{'both' if lengths is not None else 'neither'}."
        )
    if lengths is not None:
        lens = _tensor_arg(fn, "lengths", lengths, (1,), "int", "[B]")

        def key_padding_(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return kv_idx < lens[b]

        return _named(key_padding_, "key_padding")
    am = _tensor_arg(fn, "attention_mask", attention_mask, (2,), "any", "[B, S]")
    keep = am if am.dtype == torch.bool else am != 0

    def key_padding_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return keep[b, kv_idx]

    return _named(key_padding_mask, "key_padding")


# --------------------------------------------------------------------------------------------
# score mods
# --------------------------------------------------------------------------------------------
def alibi(slopes: Tensor) -> ScoreMod:
    """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)`` (a penalty growing with distance).

    ``slopes``: floating ``[H]`` (e.g. :func:`alibi_slopes_bloom`); the bias is computed in
    ``slopes``' dtype (promoted with the score's).  Named ``alibi``.
    """
    s = _tensor_arg("alibi", "slopes", slopes, (1,), "float", "[H]")

    def alibi_(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + s[h] * (kv_idx - q_idx)

    return _named(alibi_, "alibi")


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2 style): ``cap * tanh(score / cap)``.

    ``cap`` must be a finite positive number.  Named ``softcap_{cap:g}`` (``softcap_30``).
    """
    if isinstance(cap, bool) or not isinstance(cap, (int, float)):
        raise TypeError(f"softcap: cap must be a positive float, got {_describe(cap)}.")
    if not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"softcap: cap must be a finite positive float, got {cap!r}.")
    c = float(cap)

    def softcap_(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return c * torch.tanh(score / c)

    return _named(softcap_, f"softcap_{c:g}")


def relative_position_bias(table: Tensor, max_distance: int) -> ScoreMod:
    """Learned (T5-like, unbucketed) bias by clipped relative position.

    ``score + table[h, clamp(kv_idx - q_idx, -R, R) + R]`` with ``R = max_distance``;
    ``table`` is floating ``[H, 2R + 1]`` or ``[2R + 1]`` (shared by all heads).  It may be an
    ``nn.Parameter``: gradients flow to it.  Named ``relative_position_bias``.
    """
    fn = "relative_position_bias"
    r = _int_arg(fn, "max_distance", max_distance, minimum=0)
    t = _tensor_arg(
        fn, "table", table, (1, 2), "float", "[H, 2*max_distance+1] or [2*max_distance+1]"
    )
    if t.shape[-1] != 2 * r + 1:
        raise ValueError(
            f"{fn}: table's last dim must be 2*max_distance+1 = {2 * r + 1}, got {_describe(t)}."
        )
    if t.dim() == 2:

        def relative_position_bias_(
            score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
        ) -> Tensor:
            rel = torch.clamp(kv_idx - q_idx, -r, r) + r
            return score + t[h, rel]

        return _named(relative_position_bias_, "relative_position_bias")

    def relative_position_bias_shared(
        score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor:
        rel = torch.clamp(kv_idx - q_idx, -r, r) + r
        return score + t[rel]

    return _named(relative_position_bias_shared, "relative_position_bias")


def compose_score_mods(*mods: ScoreMod) -> ScoreMod:
    """Chain score mods left to right: ``mods[-1](... mods[0](score, ...) ..., b, h, q, kv)``.

    With no mods the result is the identity.  Named ``compose(name0,name1,...)``.
    """
    from ._mod_eval import check_mod_arity

    for i, m in enumerate(mods):
        check_mod_arity(m, 5, f"compose_score_mods: mods[{i}]")
    chain = tuple(mods)

    def compose(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        for m in chain:
            score = m(score, b, h, q_idx, kv_idx)
        return score

    names = ",".join(getattr(m, "__name__", type(m).__name__) for m in chain)
    return _named(compose, f"compose({names})", frozen=all(is_frozen(m) for m in chain))


# --------------------------------------------------------------------------------------------
# ALiBi slopes, bit-identical to each model family's own formula
# --------------------------------------------------------------------------------------------
def _check_heads(fn: str, num_heads: Any) -> int:
    return _int_arg(fn, "num_heads", num_heads, minimum=1)


def alibi_slopes_bloom(num_heads: int, *, device: torch.device | str | None = None) -> Tensor:
    """Bloom's ALiBi slopes ``[num_heads]`` (float32), bit-identical to Transformers'.

    For ``p``, the largest power of two ``<= num_heads``, head ``k`` (1-based, ``k <= p``)
    gets ``base_p ** k`` with ``base_p = 2 ** (-8 / p)``; any further heads take the odd
    powers ``1, 3, 5, ...`` of ``base_{2p}``.  Computed in float32 on ``device``, like the
    model does.
    """
    n = _check_heads("alibi_slopes_bloom", num_heads)
    p = 1 << (n.bit_length() - 1)

    def base(k: int) -> Tensor:
        # 2 ** (-(2 ** -(log2(k) - 3))) evaluated in double, then rounded to float32
        return torch.tensor(
            2.0 ** (-(2.0 ** -(math.log2(k) - 3))), dtype=torch.float32, device=device
        )

    exps = torch.arange(1, p + 1, dtype=torch.int32, device=device)
    slopes = torch.pow(base(p), exps)
    if n > p:
        odd = torch.arange(1, 2 * (n - p), 2, dtype=torch.int32, device=device)
        slopes = torch.cat([slopes, torch.pow(base(2 * p), odd)])
    return slopes


def alibi_slopes_falcon(num_heads: int, *, device: torch.device | str | None = None) -> Tensor:
    """Falcon's ALiBi slopes ``[num_heads]``: Bloom's, rounded to bfloat16 (returned float32)."""
    _check_heads("alibi_slopes_falcon", num_heads)
    return alibi_slopes_bloom(num_heads, device=device).to(torch.bfloat16).to(torch.float32)


def alibi_slopes_mpt(
    num_heads: int, alibi_bias_max: int = 8, *, device: torch.device | str | None = None
) -> Tensor:
    """MPT's ALiBi slopes ``[num_heads]`` (float32), bit-identical to Transformers'.

    With ``P`` the smallest power of two ``>= num_heads``, the ``P`` candidate slopes are
    ``2 ** -(k * alibi_bias_max / P)`` for ``k = 1..P``; for a non-power-of-two head count
    MPT lists the odd-positioned candidates (k = 2, 4, ...) first, then the even-positioned
    ones (k = 1, 3, ...), and keeps the first ``num_heads``.
    """
    fn = "alibi_slopes_mpt"
    n = _check_heads(fn, num_heads)
    if isinstance(alibi_bias_max, bool) or not isinstance(alibi_bias_max, (int, float)):
        raise TypeError(
            f"{fn}: alibi_bias_max must be a positive number, got {_describe(alibi_bias_max)}."
        )
    if not math.isfinite(alibi_bias_max) or alibi_bias_max <= 0:
        raise ValueError(f"{fn}: alibi_bias_max must be positive and finite, got {alibi_bias_max}.")
    big = 1 << (n - 1).bit_length()
    k = torch.arange(1, big + 1, dtype=torch.int64, device=device).to(torch.float32)
    slopes = torch.pow(2, k * (alibi_bias_max / big)).reciprocal()
    if big != n:
        slopes = torch.cat([slopes[1::2], slopes[0::2]])[:n]
    return slopes


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------
def render_mask(
    mask_mod: MaskMod, q_len: int = 24, kv_len: int = 24, *, b: int = 0, h: int = 0
) -> str:
    """Draw ``mask_mod`` for batch ``b`` / head ``h`` as text: ``█`` allowed, ``.`` not.

    One line per query (``q_len`` lines of ``kv_len`` characters).
    """
    from ._mod_eval import check_mod_arity, eval_mask_mod

    check_mod_arity(mask_mod, 4, "mask_mod")
    q_len = _int_arg("render_mask", "q_len", q_len, minimum=1)
    kv_len = _int_arg("render_mask", "kv_len", kv_len, minimum=1)

    def idx(x: int) -> Tensor:
        return torch.tensor([x], dtype=torch.long)

    grid = eval_mask_mod(mask_mod, idx(b), idx(h), torch.arange(q_len), torch.arange(kv_len))
    return "\n".join("".join("█" if v else "." for v in row) for row in grid[0, 0].tolist())


def _gallery(n: int = 24) -> list[tuple[str, MaskMod, dict[str, int]]]:
    doc_lens = [5, 9, 3, 7]
    offsets = torch.tensor([0, 5, 14, 17, 24])
    pos = torch.cat([torch.arange(k) for k in doc_lens])
    ids = document_ids_from_offsets(offsets, n)
    padded_ids = torch.where(torch.arange(n) < 20, ids, torch.full_like(ids, -1))
    dec = 4
    return [
        ("causal_mask", causal_mask, {}),
        ("causal(4), 4 queries vs 24 keys (decode)", causal(n - dec), {"q_len": dec}),
        ("sliding_window(6)", sliding_window(6), {}),
        ("sliding_window(6, causal=False)", sliding_window(6, causal=False), {}),
        ("chunked(8)", chunked(8), {}),
        ("chunked(8, causal=False)", chunked(8, causal=False), {}),
        ("document_mask(ids)", document_mask(ids), {}),
        (
            "document_mask(ids, causal=True), last 4 tokens padding",
            document_mask(padded_ids, causal=True),
            {},
        ),
        ("documents_from_offsets([0, 5, 14, 17, 24], 24)", documents_from_offsets(offsets, n), {}),
        ("documents_from_position_ids(...)", documents_from_position_ids(pos), {}),
        ("prefix_lm(10)", prefix_lm(10), {}),
        ("prefix_lm(tensor([6, 12])), batch 1", prefix_lm(torch.tensor([6, 12])), {"b": 1}),
        ("key_padding(lengths=tensor([18]))", key_padding(torch.tensor([18])), {}),
        (
            "key_padding(attention_mask=...) (left padding of 5)",
            key_padding(attention_mask=(torch.arange(n) >= 5)[None]),
            {},
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print every mask of the library as a 24x24 text grid (``█`` allowed, ``.`` not)."""
    blocks = []
    for title, mod, kw in _gallery():
        q_len = kw.pop("q_len", 24)
        blocks.append(f"{title}  [{mod.__name__}]\n{render_mask(mod, q_len, 24, **kw)}\n")
    print("\n".join(blocks))  # noqa: T201 - command-line output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
