"""Evaluate ``score_mod`` / ``mask_mod`` on index tiles with torch's scalar semantics.

A mod is written for one ``(b, h, q_idx, kv_idx)`` at a time, as if under ``torch.vmap``
over all four (that is how :func:`torch.nn.attention.flex_attention.create_mask`
evaluates it).  Evaluating a mod on broadcast index tiles (``b`` as ``[B, 1, 1, 1]``,
``q_idx`` as ``[1, 1, M, 1]`` ...) is much cheaper, but only gives identical results
when every operation is elementwise and every captured tensor is indexed down to a
scalar.  :class:`_BroadcastGuard` watches a broadcast evaluation and reports whether it
stayed inside that safe subset; if not, the mod is re-evaluated with nested ``vmap``.

All index tensors here are ``int64`` (what ``torch.arange`` gives, as in torch's
``create_mask``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "check_mod_arity",
    "eval_mask_mod",
    "eval_score_mod",
    "find_captured_tensors",
]

_TENSOR_DUNDERS = {
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__",
    "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__",
    "__floordiv__", "__rfloordiv__", "__ifloordiv__", "__mod__", "__rmod__", "__imod__",
    "__pow__", "__rpow__", "__ipow__", "__and__", "__rand__", "__iand__",
    "__or__", "__ror__", "__ior__", "__xor__", "__rxor__", "__ixor__",
    "__invert__", "__neg__", "__pos__", "__abs__",
    "__lshift__", "__rlshift__", "__ilshift__", "__rshift__", "__rrshift__", "__irshift__",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
}
_ELEMENTWISE_NAMES = {
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide",
    "floor_divide", "remainder", "fmod", "pow", "float_power",
    "eq", "ne", "lt", "le", "gt", "ge", "greater", "greater_equal", "less", "less_equal",
    "not_equal", "logical_and", "logical_or", "logical_not", "logical_xor",
    "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not",
    "bitwise_left_shift", "bitwise_right_shift",
    "neg", "negative", "abs", "absolute", "clamp", "clip", "clamp_min", "clamp_max",
    "minimum", "maximum", "fmin", "fmax", "where",
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "tanh", "sigmoid",
    "sqrt", "rsqrt", "square", "floor", "ceil", "round", "trunc", "sign", "sgn",
    "sin", "cos", "erf", "reciprocal", "relu", "softplus", "atan", "atan2",
    "to", "type", "float", "double", "half", "bfloat16", "int", "long", "bool", "short",
    "isneginf", "isposinf", "isinf", "isnan", "isfinite", "nan_to_num",
    "ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full",
    "new_tensor", "tensor", "scalar_tensor", "as_tensor", "lerp", "addcmul", "copysign",
    "contiguous", "clone", "detach", "requires_grad_", "masked_fill",
}
# property reads (``.dtype``, ``.device`` ...) reach torch-function modes as ``__get__``;
# these change meaning under broadcasting.
_SHAPE_PROPERTIES = {"shape", "ndim"}


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "__get__:" + str(getattr(owner, "__name__", ""))
    return name


class _GetItemToIndex(TorchFunctionMode):
    """Route ``tensor[idx]`` with tensor/int indices through ``aten.index``.

    ``Tensor.__getitem__`` with a 0-d tensor index calls ``__index__`` on it, which
    ``vmap`` cannot batch; ``aten.index`` has a batching rule.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            x, idx = args
            idx_t = idx if isinstance(idx, tuple) else (idx,)
            if idx_t and all(
                isinstance(i, int) and not isinstance(i, bool)
                or isinstance(i, torch.Tensor) and not i.dtype.is_floating_point
                and i.dtype != torch.bool
                for i in idx_t
            ):
                ind = [
                    i if isinstance(i, torch.Tensor)
                    else torch.tensor(i, dtype=torch.long, device=x.device)
                    for i in idx_t
                ]
                return torch.ops.aten.index(x, ind)
        return func(*args, **kwargs)


class _NotBroadcastable(Exception):
    """Raised by :class:`_BroadcastGuard` to stop a broadcast evaluation at the first op
    whose broadcast meaning differs from vmap's."""


class _BroadcastGuard(TorchFunctionMode):
    """Watch a broadcast evaluation; ``safe`` stays True only if it matches vmap.

    The first op that breaks the match stops the evaluation (it is not run): under
    broadcasting it could index out of bounds, which on CUDA is a device-side assert that
    poisons the context rather than a Python error.
    """

    def __init__(self, inputs: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.safe = True
        self.reason = ""
        self._derived: set[int] = {id(t) for t in inputs}
        self._keep: list[torch.Tensor] = list(inputs)

    def _fail(self, why: str) -> NoReturn:
        if self.safe:
            self.safe = False
            self.reason = why
        raise _NotBroadcastable(why)

    def _mark(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self._derived.add(id(out))
            self._keep.append(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                self._mark(o)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _func_name(func)
        if name.startswith("__get__:"):
            if name[8:] in _SHAPE_PROPERTIES:
                self._fail(f"reads .{name[8:]}")
            return func(*args, **kwargs)
        if func is torch.Tensor.__getitem__:
            x, idx = args
            idx_t = idx if isinstance(idx, tuple) else (idx,)
            if id(x) in self._derived:
                self._fail("indexes a computed tensor")
            if len(idx_t) != x.dim() or not all(
                (isinstance(i, int) and not isinstance(i, bool))
                or (isinstance(i, torch.Tensor) and not i.dtype.is_floating_point
                    and i.dtype != torch.bool)
                for i in idx_t
            ):
                self._fail("indexes a captured tensor only partly")
            ind = [
                i if isinstance(i, torch.Tensor)
                else torch.tensor(i, dtype=torch.long, device=x.device)
                for i in idx_t
            ]
            try:
                ind = list(torch.broadcast_tensors(*ind))
            except RuntimeError:
                self._fail("index shapes do not broadcast")
            out = torch.ops.aten.index(x, ind)
            self._mark(out)
            return out
        if name not in _TENSOR_DUNDERS and name not in _ELEMENTWISE_NAMES:
            self._fail(f"calls {name or func!r}")
        else:
            for a in list(args) + list(kwargs.values()):
                for t in a if isinstance(a, (tuple, list)) else (a,):
                    if (
                        isinstance(t, torch.Tensor)
                        and id(t) not in self._derived
                        and t.dim() != 0
                    ):
                        self._fail(f"uses a captured tensor of shape {tuple(t.shape)} "
                                   "without indexing it")
        out = func(*args, **kwargs)
        self._mark(out)
        return out


def _vmap_bhqkv(fn: Callable, score: bool) -> Callable:
    prefix = (0,) if score else ()
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None),
                 (0, None, None, None)):
        fn = torch.vmap(fn, in_dims=prefix + dims, out_dims=0)
    return fn


# code objects of mods that once failed the broadcast check: go straight to vmap
_NEEDS_VMAP: set[Any] = set()


def _mod_key(fn: Callable) -> Any:
    return getattr(fn, "__code__", None) or type(fn)


def _eval(fn: Callable, score: torch.Tensor | None, b: torch.Tensor, h: torch.Tensor,
          q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    Bt, Ht, M, N = b.numel(), h.numel(), q_idx.numel(), kv_idx.numel()
    full = (Bt, Ht, M, N)
    key = _mod_key(fn)
    if key not in _NEEDS_VMAP:
        bb, hh = b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1)
        qq, kk = q_idx.view(1, 1, -1, 1), kv_idx.view(1, 1, 1, -1)
        inputs = (bb, hh, qq, kk) if score is None else (score, bb, hh, qq, kk)
        guard = _BroadcastGuard(inputs)
        try:
            with guard:
                out = fn(*inputs)
        except Exception:  # noqa: BLE001 - anything odd: fall back to vmap semantics
            guard.safe = False
        if guard.safe and isinstance(out, torch.Tensor) and out.dim() <= 4:
            try:
                return out.expand(full) if out.shape != full else out
            except RuntimeError:
                pass
        _NEEDS_VMAP.add(key)
    with _GetItemToIndex():
        if score is None:
            out = _vmap_bhqkv(fn, False)(b, h, q_idx, kv_idx)
        else:
            out = _vmap_bhqkv(fn, True)(score, b, h, q_idx, kv_idx)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != full:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        kind = "score_mod" if score is not None else "mask_mod"
        raise ValueError(
            f"{kind} must return one scalar per (b, h, q_idx, kv_idx); evaluated over "
            f"{full} it returned {got}. Index captured tensors down to a scalar."
        )
    return out


def eval_mask_mod(mask_mod: Callable, b: torch.Tensor, h: torch.Tensor,
                  q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Evaluate ``mask_mod`` on the outer product of 1-D index vectors.

    ``b [Bt]``, ``h [Ht]``, ``q_idx [M]``, ``kv_idx [N]`` (int64) give a bool tensor of
    shape ``[Bt, Ht, M, N]`` (possibly an expanded view).
    """
    out = _eval(mask_mod, None, b, h, q_idx, kv_idx)
    if out.dtype != torch.bool:
        raise TypeError(
            f"mask_mod must return a bool tensor, got dtype {out.dtype}; compare or "
            "combine with &, |, ~ (e.g. `return q_idx >= kv_idx`)."
        )
    return out


def eval_score_mod(score_mod: Callable, score: torch.Tensor, b: torch.Tensor,
                   h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
                   ) -> torch.Tensor:
    """Evaluate ``score_mod`` on ``score [Bt, Ht, M, N]`` with 1-D index vectors."""
    out = _eval(score_mod, score, b, h, q_idx, kv_idx)
    if not out.dtype.is_floating_point:
        raise TypeError(
            f"score_mod must return a floating-point score, got dtype {out.dtype}."
        )
    return out


def _num_positional(fn: Callable) -> int | None:
    code = getattr(fn, "__code__", None)
    if inspect.isfunction(fn) and code is not None and not hasattr(fn, "__wrapped__"):
        # fast path for plain functions (this runs on every attention call)
        if code.co_flags & inspect.CO_VARARGS:
            return None
        return code.co_argcount - len(fn.__defaults__ or ())
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL,):
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
    return n


def check_mod_arity(fn: Any, expected: int, arg_name: str) -> None:
    """Raise ``TypeError`` unless ``fn`` is callable with ``expected`` positional args."""
    if not callable(fn):
        raise TypeError(f"{arg_name} must be callable, got {type(fn).__name__}.")
    n = _num_positional(fn)
    if n is not None and n != expected:
        sig = ("(score, b, h, q_idx, kv_idx)" if expected == 5
               else "(b, h, q_idx, kv_idx)")
        raise TypeError(
            f"{arg_name} must take {expected} positional arguments {sig}, but "
            f"{getattr(fn, '__name__', fn)!r} takes {n}."
        )


class _CaptureRecorder(TorchFunctionMode):
    def __init__(self, inputs: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self._derived: set[int] = {id(t) for t in inputs}
        self._keep: list[torch.Tensor] = list(inputs)
        self.captured: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in list(args) + list(kwargs.values()):
            for t in a if isinstance(a, (tuple, list)) else (a,):
                if isinstance(t, torch.Tensor) and id(t) not in self._derived:
                    self.captured.setdefault(id(t), t)
        out = func(*args, **kwargs)
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self._derived.add(id(o))
                self._keep.append(o)
        return out


def find_captured_tensors(fn: Callable, score: bool, device: torch.device | str = "cpu"
                          ) -> list[torch.Tensor]:
    """Tensors a mod reads that are not its inputs (closures, globals, module params).

    Found by running the mod once on a scalar probe under vmap semantics. Tensors
    created inside the mod are not reported.
    """
    idx = torch.zeros((), dtype=torch.long, device=device)
    inputs = (idx, idx.clone(), idx.clone(), idx.clone())
    if score:
        inputs = (torch.zeros((), dtype=torch.float32, device=device),) + inputs
    rec = _CaptureRecorder(inputs)
    try:
        with _GetItemToIndex(), rec, torch.no_grad():
            fn(*inputs)
    except Exception:  # noqa: BLE001 - errors surface again at evaluation time
        pass
    return list(rec.captured.values())


_FROZEN_ATTR = "_hf_flexattn_frozen"


def freeze(fn: Callable) -> Callable:
    """Mark ``fn`` as a mod whose closure never changes (no rebinding of captured names, no
    swapped tensors; tensor *values* may change), so the Triton backend may key it by
    identity and skip the structural walk on every call. The library's mod factories and the
    Transformers integration mark theirs. Returns ``fn``."""
    setattr(fn, _FROZEN_ATTR, True)
    return fn


_FAMILY_ATTR = "_hf_flexattn_family"


def freeze_family(fn: Callable, token: Any, captures: tuple) -> Callable:
    """:func:`freeze` ``fn`` and declare it one of a *family* of mods: closures made by one
    factory whose generated code depends only on the hashable ``token`` (which must name the
    factory and every constant the code bakes in) and on the dtype and rank of ``captures``,
    the tensors ``fn`` reads, in the order it first reads them. The Triton backend then
    prepares a new member (a new decoding step's mask, say) by a dictionary lookup instead of
    walking its closure; it checks once, when it first compiles a family, that the compiler
    found exactly ``captures``. Returns ``fn``."""
    setattr(fn, _FAMILY_ATTR, (token, tuple(captures)))
    return freeze(fn)


def is_frozen(fn: Any) -> bool:
    """Whether ``fn`` is ``None`` or was marked with :func:`freeze`."""
    return fn is None or getattr(fn, _FROZEN_ATTR, False) is True
