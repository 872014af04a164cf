"""The mod compiler: ``score_mod`` / ``mask_mod`` -> Triton statements for the kernels.

:func:`compile_mod` traces a mod once per *structure* (code objects, Python constants and
the dtype/rank/requires_grad of the tensors it captures; not the closure's identity and not
tensor values or sizes), lowers the graph to Triton statements and describes the captured
tensors that become kernel arguments.  See hf_flexattn/INTERFACES.md, "Compiler -> kernel
interface", and the docstrings of :mod:`.trace`, :mod:`.lower` and :mod:`.grad`.

Example (what a kernel template does)::

    mc = compile_mod(score_mod, "score", prefix="sm_")
    params = mc.params                  # add to the kernel signature
    body = mc.fwd_body(out="s2", score="s", b="off_b", h="off_h", q="q", kv="kv",
                       indent="    ")   # paste into the kernel
    kernel[grid](..., *mc.runtime_args())
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .grad import build_backward
from .lower import Emitter, SlotParams, interpreting
from .trace import TraceResult, UnsupportedModError, resolve_path, structure, trace_mod

__all__ = [
    "CapturedSpec",
    "ModCode",
    "UnsupportedModError",
    "cache_info",
    "clear_cache",
    "compile_mod",
    "explain",
    "trace_count",
]

logger = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class CapturedSpec:
    """One captured tensor, described by structure only.

    ``large``: an element offset into the tensor may pass 2**31 (index math in int64).
    """

    dtype: torch.dtype
    ndim: int
    needs_grad: bool  # float tensor with requires_grad, read by a score_mod
    large: bool = False


class _Compiled:
    """A traced mod plus what is needed to reuse it for another closure."""

    def __init__(self, tr: TraceResult, paths: list[tuple] | None, refs: list[Any]) -> None:
        self.tr = tr
        self.paths = paths  # per used slot, or None: look tensors up by tracing again
        self.refs = refs  # objects in the structural key by identity (kept alive)
        self.used = _used_slots(tr)
        # slots whose tensors are looked up again: the used ones, and those whose shape the
        # mod read (baked into the code: the shape must match to reuse the trace)
        self.lookup = sorted(set(self.used) | {s for s, i in enumerate(tr.slots) if i.shape_read})
        self.signature = tr.graph.signature((tr.out,))
        self._bwd: dict[frozenset, tuple] = {}
        self.lock = threading.Lock()

    def resolve(self, fn: Any) -> list[Tensor] | None:
        if self.paths is None:
            return None
        out = {}
        for s, path in zip(self.lookup, self.paths):
            try:
                t = resolve_path(fn, path)
            except (AttributeError, KeyError, IndexError, ValueError, TypeError):
                return None
            info = self.tr.slots[s]
            if not isinstance(t, Tensor) or t.dtype != info.dtype or t.dim() != info.ndim:
                return None
            if info.shape_read and tuple(t.shape) != info.shape:
                return None
            out[s] = t
        return [out[s] for s in self.used]

    def backward(self, grad_slots: frozenset) -> tuple:
        with self.lock:
            if grad_slots not in self._bwd:
                self._bwd[grad_slots] = build_backward(self.tr.graph, self.tr.out, set(grad_slots))
            return self._bwd[grad_slots]


@dataclass
class ModCode:
    """A compiled mod: Triton statements plus the captured tensors they read.

    Captured tensor ``k`` adds the kernel parameters ``{prefix}c{k}_ptr``, its strides
    ``{prefix}c{k}_s{d}`` and its sizes ``{prefix}c{k}_n{d}`` (``d < ndim``), in that order;
    :meth:`runtime_args` gives their values.  For score mods, captured tensor ``k`` that
    needs a gradient adds ``{prefix}g{k}_ptr`` to :attr:`grad_params` (an fp32, contiguous
    buffer of the tensor's shape, zero-initialised, that the backward kernel accumulates
    into with ``tl.atomic_add``; see :meth:`grad_buffers`).
    """

    kind: str
    key: tuple
    captured: list[Tensor]
    specs: list[CapturedSpec]
    params: list[str]
    grad_params: list[str] = field(default_factory=list)
    name: str = ""
    prefix: str = ""
    _c: _Compiled | None = field(default=None, repr=False, compare=False)

    # -------------------------------------------------------------- runtime values
    def runtime_args(self, pointers: bool = False) -> list:
        """Values for :attr:`params`, in order: per tensor the tensor (its ``data_ptr()`` with
        ``pointers``), strides, sizes."""
        out: list = []
        for t in self.captured:
            out.append(t.data_ptr() if pointers else t)
            out.extend(t.stride())  # Python ints (eager tensors: this runs outside tracing)
            out.extend(t.shape)
        return out

    @staticmethod
    def capture_args(tensors: list[Tensor] | tuple[Tensor, ...]) -> tuple[tuple, tuple]:
        """``(runtime_args(), runtime_args(pointers=True))`` of a ModCode whose captured
        tensors are ``tensors``, without binding one (a decoding step's new captures)."""
        args: list = []
        ptrs: list = []
        for t in tensors:
            st, sh = t.stride(), t.shape
            args.append(t)
            args.extend(st)
            args.extend(sh)
            ptrs.append(t.data_ptr())
            ptrs.extend(st)
            ptrs.extend(sh)
        return tuple(args), tuple(ptrs)

    def grad_buffers(self) -> list[Tensor]:
        """Fresh zero fp32 buffers for :attr:`grad_params` (one per tensor needing grad)."""
        return [
            torch.zeros(t.shape, dtype=torch.float32, device=t.device)
            for t, s in zip(self.captured, self.specs)
            if s.needs_grad
        ]

    # -------------------------------------------------------------- code
    def _slot_params(self) -> list[SlotParams | None]:
        assert self._c is not None
        nslots = len(self._c.tr.slots)
        sp: list[SlotParams | None] = [None] * nslots
        for k, (s, spec) in enumerate(zip(self._c.used, self.specs)):
            p = f"{self.prefix}c{k}"
            sp[s] = SlotParams(
                ptr=f"{p}_ptr",
                strides=[f"{p}_s{d}" for d in range(spec.ndim)],
                sizes=[f"{p}_n{d}" for d in range(spec.ndim)],
                large=spec.large,
                grad_ptr=f"{self.prefix}g{k}_ptr" if spec.needs_grad else None,
            )
        return sp

    def fwd_body(
        self,
        *,
        out: str,
        score: str | None = None,
        b: str,
        h: str,
        q: str,
        kv: str,
        indent: str = "",
        transposed: bool = False,
    ) -> str:
        """Triton statements assigning ``out``.

        ``out``: fp32 ``[BM, BN]`` for score mods, int1 ``[BM, BN]`` for mask mods, from
        ``score`` (fp32 ``[BM, BN]``), ``b``, ``h`` (int32 scalars), ``q`` (``[BM, 1]`` int32)
        and ``kv`` (``[1, BN]`` int32).  Loads of captured tensors are masked to the tensor's
        sizes, so positions past the sequence lengths never read out of range.
        ``transposed=True``: ``q`` is ``[1, BM]``, ``kv`` is ``[BN, 1]`` and ``score``/``out``
        are ``[BN, BM]`` (the dK/dV kernel's orientation).
        """
        assert self._c is not None
        if self.kind == "score" and score is None:
            raise ValueError("fwd_body of a score mod needs `score`, got None.")
        tr = self._c.tr
        em, qn, kvn = self._emitter(indent, score, b, h, q, kv, None, transposed)
        lt = "f32" if self.kind == "score" else "i1"
        em.assign_full(out, tr.out, lt, qn, kvn)
        return em.text()

    def bwd_body(
        self,
        *,
        grad_score: str,
        grad_out: str,
        score: str,
        b: str,
        h: str,
        q: str,
        kv: str,
        valid: str,
        indent: str = "",
        transposed: bool = False,
    ) -> str:
        """Triton statements for the backward of a score mod.

        Assigns ``grad_score`` = d(out)/d(score) * ``grad_out`` (fp32 ``[BM, BN]``) and
        atomically adds d(out)/d(captured) * ``grad_out`` into the buffers of
        :attr:`grad_params` where ``valid`` (bool ``[BM, BN]``) holds.  Loads indexed only by
        ``b``/``h`` (or only by ``q``, or only by ``kv``) are reduced over the tile before the
        atomic add.  ``transposed=True``: tiles are ``[BN, BM]`` with ``q`` ``[1, BM]`` and
        ``kv`` ``[BN, 1]`` (see :meth:`fwd_body`).
        """
        assert self._c is not None
        if self.kind != "score":
            raise ValueError(f"bwd_body is only defined for score mods, not {self.kind!r}.")
        grad_slots = frozenset(s for s, spec in zip(self._c.used, self.specs) if spec.needs_grad)
        gscore, loads = self._c.backward(grad_slots)
        em, qn, kvn = self._emitter(indent, score, b, h, q, kv, grad_out, transposed)
        if gscore is None:
            em.line(f"{grad_score} = tl.zeros_like({grad_out})")
        else:
            em.assign_full(grad_score, gscore, "f32", qn, kvn)
        for load, adj in loads:
            em.emit_grad_atomic(load, adj, valid)
        return em.text()

    def _emitter(
        self, indent, score, b, h, q, kv, gout, transposed=False
    ) -> tuple[Emitter, str, str]:
        assert self._c is not None
        inputs = {"b": b, "h": h, "q": q, "kv": kv}
        if score is not None:
            inputs["score"] = score
        if gout is not None:
            inputs["gout"] = gout
        em = Emitter(
            self._c.tr.graph,
            self.prefix,
            inputs,
            self._slot_params(),
            indent,
            transposed=transposed,
        )
        qn, kvn = q, kv
        if not q.isidentifier():
            qn = f"{self.prefix}q"
            em.line(f"{qn} = {q}")
            em.inputs["q"] = qn
        if not kv.isidentifier():
            kvn = f"{self.prefix}kv"
            em.line(f"{kvn} = {kv}")
            em.inputs["kv"] = kvn
        return em, qn, kvn

    def __repr__(self) -> str:
        body = self.fwd_body(
            out="out",
            score="score" if self.kind == "score" else None,
            b="b",
            h="h",
            q="q",
            kv="kv",
            indent="    ",
        )
        return (
            f"ModCode(kind={self.kind!r}, name={self.name!r}, params={self.params}, "
            f"grad_params={self.grad_params})\n{body}"
        )


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
_CACHE: OrderedDict[tuple, _Compiled] = OrderedDict()
_CACHE_MAX = 512
_LOCK = threading.Lock()
_STATS = {"traces": 0, "hits": 0, "uncacheable": 0}


def trace_count() -> int:
    """How many times a mod was traced in this process (a cache hit does not trace)."""
    return _STATS["traces"]


def cache_info() -> dict[str, int]:
    """Trace-cache statistics: traces, hits, uncacheable mods, cached entries."""
    with _LOCK:
        return dict(_STATS, entries=len(_CACHE))


def clear_cache() -> None:
    """Forget every cached trace (statistics are kept)."""
    with _LOCK:
        _CACHE.clear()


def _used_slots(tr: TraceResult) -> list[int]:
    g = tr.graph
    return sorted({g[i].attr[0] for i in g.live((tr.out,)) if g[i].op == "load"})


def _is_large(t: Tensor) -> bool:
    if t.numel() == 0:
        return False
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) >= _INT32_MAX


def compile_mod(fn: Any, kind: str, *, prefix: str) -> ModCode:
    """Compile ``fn`` (``kind`` ``"score"`` or ``"mask"``) for the Triton kernels.

    ``prefix`` (e.g. ``"sm_"``/``"mm_"``) starts every kernel parameter and local name the
    code adds.  Raises :class:`UnsupportedModError` (a ``TypeError``) for constructs the
    compiler cannot translate, naming the construct and the mod.
    """
    if kind not in ("score", "mask"):
        raise ValueError(f"kind must be 'score' or 'mask', got {kind!r}.")
    if not isinstance(prefix, str) or not (prefix + "x").isidentifier():
        raise ValueError(f"prefix must be a Python identifier prefix like 'sm_', got {prefix!r}.")
    if not callable(fn):
        raise TypeError(f"{kind}_mod must be callable, got {type(fn).__name__}.")
    st = structure(fn)
    skey = (kind, st[0]) if st is not None else None
    entry = None
    tensors = None
    if skey is not None:
        try:
            with _LOCK:
                entry = _CACHE.get(skey)
                if entry is not None:
                    _CACHE.move_to_end(skey)
        except TypeError:  # an unhashable piece slipped into the key
            skey = None
    if entry is not None:
        tensors = entry.resolve(fn)
        if tensors is not None:
            _STATS["hits"] += 1
    if tensors is None:
        tr = trace_mod(fn, kind)
        _STATS["traces"] += 1
        paths: list[tuple] | None = None
        refs: list[Any] = []
        if st is not None:
            refs = st[2]
            lookup = sorted(
                set(_used_slots(tr)) | {s for s, i in enumerate(tr.slots) if i.shape_read}
            )
            found = [st[1].get(id(tr.tensors[s])) for s in lookup]
            if all(p is not None for p in found):
                paths = found  # type: ignore[assignment]
        entry = _Compiled(tr, paths, refs)
        if paths is None or skey is None:
            _STATS["uncacheable"] += 1
            logger.debug(
                "%s_mod %s: captured tensors not reachable by path; not cached", kind, tr.name
            )
        else:
            with _LOCK:
                _CACHE[skey] = entry
                while len(_CACHE) > _CACHE_MAX:
                    _CACHE.popitem(last=False)
        tensors = [tr.tensors[s] for s in entry.used]
    specs = [
        CapturedSpec(
            dtype=t.dtype,
            ndim=t.dim(),
            needs_grad=bool(kind == "score" and t.dtype.is_floating_point and t.requires_grad),
            large=_is_large(t),
        )
        for t in tensors
    ]
    params: list[str] = []
    grad_params: list[str] = []
    for k, spec in enumerate(specs):
        p = f"{prefix}c{k}"
        params.append(f"{p}_ptr")
        params.extend(f"{p}_s{d}" for d in range(spec.ndim))
        params.extend(f"{p}_n{d}" for d in range(spec.ndim))
        if spec.needs_grad:
            grad_params.append(f"{prefix}g{k}_ptr")
    key = (kind, prefix, entry.signature, tuple(specs))
    return ModCode(
        kind=kind,
        key=key,
        captured=list(tensors),
        specs=specs,
        params=params,
        grad_params=grad_params,
        name=entry.tr.name,
        prefix=prefix,
        _c=entry,
    )


def explain(fn: Any, kind: str) -> str:
    """The Triton source the compiler generates for ``fn`` (for reading and debugging)."""
    prefix = "sm_" if kind == "score" else "mm_"
    mc = compile_mod(fn, kind, prefix=prefix)
    lines = [f"# {kind}_mod {mc.name}", f"# kernel params: {', '.join(mc.params) or '-'}"]
    lines.append(f"# interpreter lowering: {interpreting()}")
    lines.append("# forward")
    lines.append(
        mc.fwd_body(
            out="out",
            score="score" if kind == "score" else None,
            b="b",
            h="h",
            q="q",
            kv="kv",
            indent="",
        )
    )
    if kind == "score":
        lines.append(f"# backward (grad params: {', '.join(mc.grad_params) or '-'})")
        lines.append(
            mc.bwd_body(
                grad_score="grad_score",
                grad_out="grad_out",
                score="score",
                b="b",
                h="h",
                q="q",
                kv="kv",
                valid="valid",
                indent="",
            )
        )
    return "\n".join(lines)
