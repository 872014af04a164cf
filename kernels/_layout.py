"""Output layouts: outputs follow the query's memory order, as torch's flex_attention does.

Transformers hands attention ``q`` as a ``[B, H, L, E]`` view of a ``[B, L, H, E]`` tensor and
wants ``[B, L, H, Ev]`` back. An output laid out like ``q`` makes that last transpose free (no
copy per layer); gradients laid out like their inputs make the way back through the
projections free as well.
"""

from __future__ import annotations

import torch

__all__ = ["empty_like_query", "query_order", "strides_in_order"]


def query_order(q: torch.Tensor) -> tuple[int, ...] | None:
    """q's leading dims from outermost to innermost (by decreasing stride; ties keep their
    order), or None when that is the plain order ``0, 1, ..., n-1``."""
    st = q.stride()
    n = q.dim() - 1
    order = tuple(sorted(range(n), key=lambda d: -st[d]))
    return None if order == tuple(range(n)) else order


def strides_in_order(shape: tuple[int, ...], order: tuple[int, ...] | None) -> tuple[int, ...]:
    """Strides of a dense tensor of ``shape`` whose leading dims are stored in ``order`` and
    whose last dim is innermost."""
    n = len(shape) - 1
    out = [0] * (n + 1)
    out[n] = 1
    acc = shape[n]
    for d in reversed(order if order is not None else range(n)):
        out[d] = acc
        acc *= shape[d]
    return tuple(out)


def empty_like_query(q: torch.Tensor, last: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised ``[*q.shape[:-1], last]`` tensor (``dtype`` default q's) stored in q's
    memory order (:func:`query_order`), last dim innermost (stride 1)."""
    shape = (*q.shape[:-1], last)
    dtype = q.dtype if dtype is None else dtype
    order = query_order(q)
    if order is None:
        return torch.empty(shape, dtype=dtype, device=q.device)
    return torch.empty_strided(shape, strides_in_order(shape, order), dtype=dtype, device=q.device)
