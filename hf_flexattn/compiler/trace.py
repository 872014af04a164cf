"""Trace a mod once on symbolic 0-d tensors into a :class:`~.graph.Graph`.

The mod runs under a :class:`torch.overrides.TorchFunctionMode` on 0-d ``meta`` tensors
(``b``, ``h``, ``q_idx``, ``kv_idx`` int64, ``score`` float32).  Every torch operation on
them becomes a graph node whose dtype is the dtype torch itself computes for the meta
result, so type promotion is torch's.  A real (non-meta) tensor met as an argument is a
*captured* tensor (closure, global, module parameter): it becomes a kernel argument (a
"slot") and is replaced by a meta copy.  Indexing a captured tensor with traced or Python
integer indices becomes a ``load`` node; partial indexing (``row = table[i]``, then
``row[0]``) is followed until the tensor is indexed down to a scalar.

Python control flow on a traced value (``if``, ``while``, ``int()``, ``.item()``,
``range(q_idx)`` ...) cannot be traced and raises :class:`UnsupportedModError`.

This module also computes the *structural key* of a mod (:func:`structure`): its code
objects, Python constants and the dtype/rank/requires_grad of the tensors it can reach,
together with the path to each reachable tensor, so that a new closure with the same
structure reuses the trace and only its tensors are looked up again.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .graph import DEP_B, DEP_H, DEP_KV, DEP_Q, DEP_S, Graph

__all__ = [
    "UnsupportedModError",
    "TraceResult",
    "trace_mod",
    "structure",
    "constants",
    "resolve_path",
    "mod_name",
]

_BACKEND_HINT = 'or run this mod with kernel_options={"backend": "torch"}'


class UnsupportedModError(TypeError):
    """A mod uses a construct the Triton mod compiler cannot translate."""


def mod_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None and isinstance(fn, functools.partial):
        return f"partial({mod_name(fn.func)})"
    if name is None:
        name = type(fn).__name__
    code = getattr(fn, "__code__", None)
    if code is not None:
        return f"{name!s} ({code.co_filename}:{code.co_firstlineno})"
    return str(name)


# ---------------------------------------------------------------------------------------------
# trace result
# ---------------------------------------------------------------------------------------------
@dataclass
class SlotInfo:
    dtype: torch.dtype
    ndim: int
    requires_grad: bool
    shape: tuple[int, ...]
    shape_read: bool = False  # the mod read the shape: it is baked into the graph


@dataclass
class TraceResult:
    kind: str
    name: str
    graph: Graph
    out: int
    slots: list[SlotInfo]
    tensors: list[torch.Tensor] = field(repr=False)  # the captured tensors of this trace


# ---------------------------------------------------------------------------------------------
# op tables
# ---------------------------------------------------------------------------------------------
_BIN = {
    "add": "add",
    "sub": "sub",
    "subtract": "sub",
    "mul": "mul",
    "multiply": "mul",
    "div": "div",
    "divide": "div",
    "true_divide": "div",
    "floor_divide": "floordiv",
    "remainder": "mod",
    "fmod": "fmod",
    "pow": "pow",
    "bitwise_and": "and",
    "bitwise_or": "or",
    "bitwise_xor": "xor",
    "bitwise_left_shift": "shl",
    "bitwise_right_shift": "shr",
    "logical_and": "land",
    "logical_or": "lor",
    "logical_xor": "lxor",
    "eq": "eq",
    "ne": "ne",
    "lt": "lt",
    "le": "le",
    "gt": "gt",
    "ge": "ge",
    "greater": "gt",
    "greater_equal": "ge",
    "less": "lt",
    "less_equal": "le",
    "not_equal": "ne",
    "maximum": "maximum",
    "minimum": "minimum",
}
_DUNDER_BIN = {
    "add": "add",
    "sub": "sub",
    "mul": "mul",
    "truediv": "div",
    "div": "div",
    "floordiv": "floordiv",
    "mod": "mod",
    "pow": "pow",
    "and": "and",
    "or": "or",
    "xor": "xor",
    "lshift": "shl",
    "rshift": "shr",
}
for _d, _op in _DUNDER_BIN.items():
    _BIN[f"__{_d}__"] = _op
    _BIN[f"__r{_d}__"] = _op  # operands swapped below
    _BIN[f"__i{_d}__"] = _op
for _d in ("eq", "ne", "lt", "le", "gt", "ge"):
    _BIN[f"__{_d}__"] = _d
_UN = {
    "neg": "neg",
    "negative": "neg",
    "__neg__": "neg",
    "abs": "abs",
    "absolute": "abs",
    "__abs__": "abs",
    "exp": "exp",
    "exp2": "exp2",
    "log": "log",
    "log2": "log2",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "sqrt": "sqrt",
    "rsqrt": "rsqrt",
    "floor": "floor",
    "ceil": "ceil",
    "trunc": "trunc",
    "fix": "trunc",
    "sign": "sign",
    "sin": "sin",
    "cos": "cos",
    "erf": "erf",
    "reciprocal": "reciprocal",
    "square": "square",
    "relu": "relu",
    "logical_not": "lnot",
    "bitwise_not": "not",
    "__invert__": "not",
    "round": "round",
}
_IDENTITY = {"__pos__", "positive", "contiguous", "clone", "detach", "requires_grad_"}
_CASTS = {
    "float": torch.float32,
    "double": torch.float64,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int": torch.int32,
    "long": torch.int64,
    "short": torch.int16,
    "bool": torch.bool,
    "byte": torch.uint8,
    "char": torch.int8,
}
_FACTORIES = {
    "tensor",
    "as_tensor",
    "scalar_tensor",
    "ones",
    "zeros",
    "full",
    "ones_like",
    "zeros_like",
    "full_like",
    "new_ones",
    "new_zeros",
    "new_full",
    "new_tensor",
}
_META_QUERIES = {
    "dim",
    "ndimension",
    "size",
    "numel",
    "nelement",
    "__len__",
    "is_floating_point",
    "is_complex",
    "element_size",
    "get_device",
    "__repr__",
    "__str__",
    "is_contiguous",
    "stride",
    "result_type",
    "is_signed",
    "__hash__",
}
_SHAPE_QUERIES = {"size", "numel", "nelement", "__len__", "stride"}
_ALLOWED_PROPS = {
    "dtype",
    "device",
    "ndim",
    "shape",
    "requires_grad",
    "is_cuda",
    "is_meta",
    "layout",
    "is_leaf",
    "names",
}
_CONTROL = {
    "__bool__": "Python `if`/`while`/`and`/`or`/`not` (bool()) on a traced value",
    "item": "`.item()` on a traced value",
    "__int__": "int() on a traced value",
    "__float__": "float() on a traced value (also math.* functions)",
    "__index__": "using a traced value as a Python integer (range(), list index, "
    "slicing a Python sequence)",
    "tolist": "`.tolist()` on a traced value",
    "__complex__": "complex() on a traced value",
    "__format__": "formatting a traced value",
    "__iter__": "iterating over a traced value",
    "numpy": "`.numpy()` on a traced value",
    "__array__": "converting a traced value to numpy",
}
_NO_TENSOR_RESULT = {"__setitem__", "copy_", "fill_", "zero_", "index_put_", "masked_fill_"}


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "__get__:" + str(getattr(owner, "__name__", ""))
    return name


def _bind(name: str, params: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    if len(args) > len(params):
        raise TypeError(f"{name}: too many arguments")
    out = dict(zip(params, args))
    for k, v in kwargs.items():
        if k not in params:
            raise _Unsupported(f"`{name}(..., {k}=...)`")
        out[k] = v
    return out


class _Unsupported(Exception):
    """Internal: an unsupported construct; turned into UnsupportedModError with the mod name."""


class _Tracer(TorchFunctionMode):
    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.g = graph
        self.node_of: dict[int, int] = {}  # id(meta tensor) -> node
        self.view_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # id(meta) -> (slot, idx)
        self.keep: list[Any] = []  # keep every object whose id is a key alive
        self.slot_of: dict[int, int] = {}  # id(real tensor) -> slot
        self.slot_meta: dict[int, int] = {}  # id(meta copy) -> slot
        self.tensors: list[torch.Tensor] = []
        self.metas: list[torch.Tensor] = []
        self.slots: list[SlotInfo] = []

    # ------------------------------------------------------------------ helpers
    def new_meta(self, node: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.empty((), dtype=dtype or self.g[node].dtype, device="meta")
        self.bind(t, node)
        return t

    def bind(self, t: torch.Tensor, node: int) -> None:
        self.keep.append(t)
        self.node_of[id(t)] = node
        self.view_of.pop(id(t), None)

    def slot(self, t: torch.Tensor) -> int:
        s = self.slot_of.get(id(t))
        if s is None:
            s = len(self.tensors)
            self.slot_of[id(t)] = s
            self.tensors.append(t)
            self.keep.append(t)
            meta = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
            self.metas.append(meta)
            self.keep.append(meta)
            self.slot_meta[id(meta)] = s
            self.slots.append(SlotInfo(t.dtype, t.dim(), bool(t.requires_grad), tuple(t.shape)))
        return s

    def _slot_of_tensor(self, t: torch.Tensor) -> int | None:
        s = self.slot_meta.get(id(t))
        if s is not None:
            return s
        if t.device.type != "meta" and id(t) not in self.node_of:
            return self.slot(t)
        return None

    def value(self, x: Any, what: str = "an operand") -> int:
        """The graph node of an operand (tensor or Python number)."""
        if isinstance(x, torch.Tensor):
            n = self.node_of.get(id(x))
            if n is not None:
                return n
            if id(x) in self.view_of:
                raise _Unsupported(
                    "using a slice of a captured tensor (a tensor indexed only partly) in an "
                    "operation; index it down to one element first"
                )
            s = self._slot_of_tensor(x)
            if s is None:
                raise _Unsupported(f"an untracked meta tensor as {what}")
            if x.dim() != 0:
                raise _Unsupported(
                    f"using a captured tensor of shape {tuple(x.shape)} without indexing it "
                    "down to a scalar (index it with b, h, q_idx, kv_idx or numbers)"
                )
            return self.g.add("load", (), self.slots[s].dtype, attr=(s,), deps=0)
        if isinstance(x, bool):
            return self.g.const(x, torch.bool)
        if isinstance(x, int):
            return self.g.const(x, torch.int64)
        if isinstance(x, float):
            return self.g.const(x, torch.float64)
        raise _Unsupported(f"a {type(x).__name__} as {what}")

    def meta_arg(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            s = self.slot_of.get(id(x))
            if s is not None:
                return self.metas[s]
        if isinstance(x, (list, tuple)):
            return type(x)(self.meta_arg(v) for v in x)
        return x

    def _has_traced(self, x: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return id(x) in self.node_of or id(x) in self.view_of
        if isinstance(x, (list, tuple)):
            return any(self._has_traced(v) for v in x)
        return False

    def _tensor_args(self, args, kwargs):
        out = []
        for a in list(args) + list(kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.Tensor):
                    out.append(t)
        return out

    # ------------------------------------------------------------------ dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901
        kwargs = dict(kwargs or {})
        name = _func_name(func)
        if name.startswith("__get__:"):
            prop = name[8:]
            obj = args[0] if args else None
            if prop not in _ALLOWED_PROPS:
                raise _Unsupported(f"reading `.{prop}` of a tensor")
            if prop == "shape" and isinstance(obj, torch.Tensor):
                self._note_shape_read(obj)
            return func(*args, **kwargs)
        if name in _CONTROL:
            raise _Unsupported(_CONTROL[name])
        if func is torch.Tensor.__getitem__:
            return self._getitem(args[0], args[1])
        if name in _META_QUERIES:
            for t in self._tensor_args(args, kwargs):
                if name in _SHAPE_QUERIES:
                    self._note_shape_read(t)
            return func(*args, **kwargs)
        if name in _NO_TENSOR_RESULT or name == "__setitem__":
            raise _Unsupported(f"in-place writes (`{name}`)")

        tensors = self._tensor_args(args, kwargs)
        if name in _FACTORIES:
            return self._factory(func, name, args, kwargs)
        if not tensors:
            # no tensor operands (grad-mode switches, dtype queries, torch.arange ...)
            r = func(*args, **kwargs)
            if isinstance(r, torch.Tensor):
                if r.dim() != 0 or r.device.type == "meta":
                    raise _Unsupported(
                        f"creating a tensor with `torch.{name}` inside the mod; create it "
                        "outside the mod and capture it"
                    )
                return self._const_result(r, name)
            return r
        # constant folding: all tensor operands are known constants
        if all(id(t) in self.node_of and self.g[self.node_of[id(t)]].is_const for t in tensors):
            return self._fold(func, name, args, kwargs)
        return self._op(func, name, args, kwargs)

    def _note_shape_read(self, t: torch.Tensor) -> None:
        s = self.slot_meta.get(id(t))
        if s is None and t.device.type != "meta" and id(t) not in self.node_of:
            s = self.slot(t)
        if s is not None:
            self.slots[s].shape_read = True
        v = self.view_of.get(id(t))
        if v is not None:
            self.slots[v[0]].shape_read = True

    def _cpu_standin(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            n = self.node_of.get(id(x))
            if n is not None:
                node = self.g[n]
                val = node.value if node.is_const else 0
                return torch.tensor(val, dtype=node.dtype)
            return torch.zeros(tuple(x.shape), dtype=x.dtype)
        if isinstance(x, torch.device) or (isinstance(x, str) and x.startswith(("cuda", "meta"))):
            return "cpu"
        if isinstance(x, (list, tuple)):
            return type(x)(self._cpu_standin(v) for v in x)
        return x

    def _const_result(self, r: Any, name: str) -> torch.Tensor:
        if not isinstance(r, torch.Tensor):
            raise _Unsupported(f"`{name}` returning a {type(r).__name__}")
        if r.dim() != 0:
            raise _Unsupported(
                f"creating a tensor of shape {tuple(r.shape)} inside the mod (`{name}`); "
                "create it outside and capture it"
            )
        return self.new_meta(self.g.const(r.item(), r.dtype))

    def _factory(self, func, name, args, kwargs):
        kwargs.pop("requires_grad", None)
        kwargs.pop("pin_memory", None)
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        for t in self._tensor_args(args, kwargs):
            if id(t) in self.node_of and not name.endswith("_like") and not name.startswith("new_"):
                raise _Unsupported(f"`torch.{name}` of a traced value")
        with torch.no_grad():
            r = func(*self._cpu_standin(args), **self._cpu_standin(kwargs))
        return self._const_result(r, name)

    def _fold(self, func, name, args, kwargs):
        inplace = name.endswith("_") and not name.startswith("__") or name.startswith("__i")
        with torch.no_grad():
            r = func(*self._cpu_standin(args), **self._cpu_standin(kwargs))
        out = self._const_result(r, name)
        if inplace and isinstance(args[0], torch.Tensor):
            self.bind(args[0], self.node_of[id(out)])
            return args[0]
        return out

    # ------------------------------------------------------------------ indexing
    def _getitem(self, x: torch.Tensor, idx: Any) -> torch.Tensor:
        if id(x) in self.node_of:
            raise _Unsupported("indexing a computed (0-d) value")
        if id(x) in self.view_of:
            slot, prev = self.view_of[id(x)]
        else:
            slot = self._slot_of_tensor(x)
            if slot is None:
                raise _Unsupported("indexing an untracked tensor")
            prev = ()
        items = idx if isinstance(idx, tuple) else (idx,)
        nodes = list(prev)
        for it in items:
            if isinstance(it, bool) or it is None or it is Ellipsis or isinstance(it, slice):
                raise _Unsupported(
                    f"indexing a captured tensor with {it!r} (use integer or integer-tensor "
                    "indices only)"
                )
            if isinstance(it, torch.Tensor):
                n = self.value(it, "an index")
                if self.g[n].dtype == torch.bool or self.g[n].dtype.is_floating_point:
                    raise _Unsupported(f"indexing with a {self.g[n].dtype} tensor")
            elif isinstance(it, int):
                n = self.g.const(it, torch.int64)
            else:
                raise _Unsupported(f"indexing a captured tensor with a {type(it).__name__}")
            nodes.append(n)
        info = self.slots[slot]
        if len(nodes) > info.ndim:
            raise _Unsupported(
                f"too many indices ({len(nodes)}) for a captured tensor of rank {info.ndim}"
            )
        if len(nodes) == info.ndim:
            n = self.g.add("load", tuple(nodes), info.dtype, attr=(slot,))
            return self.new_meta(n)
        view = torch.empty(info.shape[len(nodes) :], dtype=info.dtype, device="meta")
        self.keep.append(view)
        self.view_of[id(view)] = (slot, tuple(nodes))
        return view

    # ------------------------------------------------------------------ operations
    def _op(self, func, name, args, kwargs):  # noqa: C901
        inplace = False
        base = name
        if name in _IDENTITY:
            return self._alias(args[0])
        if name in ("to", "type"):
            return self._to(name, args, kwargs)
        if name.startswith("__i") and name[3:-2] in _DUNDER_BIN:
            inplace = True
        elif name.endswith("_") and not name.startswith("__"):
            inplace, base = True, name[:-1]
        if inplace:
            x0 = args[0]
            if not isinstance(x0, torch.Tensor) or id(x0) not in self.node_of:
                raise _Unsupported(f"in-place `{name}` on a captured tensor")
        for t in self._tensor_args(args, kwargs):
            self.value(t)  # registers captures; rejects partly indexed / unindexed tensors
        margs = self.meta_arg(args)
        mkw = {k: self.meta_arg(v) for k, v in kwargs.items()}
        try:
            with torch.no_grad():
                out = func(*margs, **mkw)
        except Exception as e:  # noqa: BLE001 - torch rejects the op itself
            raise _Unsupported(f"`{name}` on these operands ({type(e).__name__}: {e})") from e
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise _Unsupported(f"`{name}` giving a non-scalar result ({shape})")
        dt = out.dtype
        node = self._build(base, name, args, kwargs, dt)
        if inplace:
            self.bind(args[0], node)
            return args[0]
        if self.g[node].dtype != dt:  # e.g. identity simplifications keep the operand's dtype
            node = self.g.add("cast", (node,), dt)
        res = torch.empty((), dtype=dt, device="meta")
        self.bind(res, node)
        return res

    def _alias(self, x: Any) -> torch.Tensor:
        n = self.value(x)
        return self.new_meta(n)

    def _to(self, name: str, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        target = None
        for a in list(args[1:]) + list(kwargs.values()):
            if isinstance(a, torch.dtype):
                target = a
            elif isinstance(a, torch.Tensor) and target is None:
                target = a.dtype
        if name == "type" and target is None:
            if len(args) + len(kwargs) == 1:
                return torch.Tensor.type(self.meta_arg(x))
            raise _Unsupported("`.type(<str>)`; use .to(dtype)")
        n = self.value(x)
        if target is None or target == self.g[n].dtype:
            return self.new_meta(n)
        if target.is_complex:
            raise _Unsupported(f"casting to {target}")
        return self.new_meta(self.g.add("cast", (n,), target))

    def _build(self, base, name, args, kwargs, dt):  # noqa: C901 - one case per op family
        g = self.g
        if base in _CASTS:
            return self._cast(base, args, kwargs, dt)
        if base in ("where",):
            a = _bind(name, ("condition", "input", "other"), args, kwargs)
            if "input" not in a:
                raise _Unsupported("single-argument `torch.where`")
            c = self._to_bool(self.value(a["condition"]))
            x, y = self.value(a["input"]), self.value(a["other"])
            return g.add("where", (c, x, y), dt)
        if base in ("clamp", "clip", "clamp_min", "clamp_max"):
            if base == "clamp_min":
                a = _bind(name, ("input", "min"), args, kwargs)
            elif base == "clamp_max":
                a = _bind(name, ("input", "max"), args, kwargs)
            else:
                a = _bind(name, ("input", "min", "max"), args, kwargs)
            x = self.value(a["input"])
            lo, hi = a.get("min"), a.get("max")
            if lo is not None and hi is not None:
                return g.add("clamp", (x, self.value(lo), self.value(hi)), dt)
            if lo is not None:
                return g.add("clamp_min", (x, self.value(lo)), dt)
            if hi is not None:
                return g.add("clamp_max", (x, self.value(hi)), dt)
            return x
        if base in ("max", "min"):
            if len(args) + len(kwargs) == 1:
                return self.value(args[0])  # reduction of a 0-d value
            a = _bind(name, ("input", "other"), args, kwargs)
            if not isinstance(a.get("other"), torch.Tensor):
                raise _Unsupported(f"`torch.{base}` with a dim argument")
            base = "maximum" if base == "max" else "minimum"
            return g.add(base, (self.value(a["input"]), self.value(a["other"])), dt)
        if base == "round":
            a = _bind(name, ("input", "decimals"), args, kwargs)
            if a.get("decimals", 0):
                raise _Unsupported("`round(..., decimals=...)`")
            return self._unary("round", self.value(a["input"]), dt)
        if base in _UN:
            a = _bind(name, ("input",), args, kwargs)
            return self._unary(_UN[base], self.value(a["input"]), dt)
        if base in _BIN:
            op = _BIN[base]
            params = ("input", "other")
            if op in ("add", "sub"):
                params += ("alpha",)
            if op == "div":
                params += ("rounding_mode",)
            if op == "pow" and base == "pow":
                params = ("input", "exponent")
            a = _bind(name, params, args, kwargs)
            x = a["input"]
            y = a.get("other", a.get("exponent"))
            if name.startswith("__r") and name[3:-2] in _DUNDER_BIN:
                x, y = y, x
            xn, yn = self.value(x), self.value(y)
            if a.get("alpha", 1) != 1:
                al = a["alpha"]
                yn = g.add(
                    "mul",
                    (yn, self.value(al)),
                    g[yn].dtype
                    if not isinstance(al, float)
                    else torch.promote_types(g[yn].dtype, torch.float32),
                )
            if op == "div":
                mode = a.get("rounding_mode")
                if mode == "floor":
                    op = "floordiv"
                elif mode == "trunc":
                    op = "truncdiv"
                elif mode is not None:
                    raise _Unsupported(f"div rounding_mode={mode!r}")
            if op in ("eq", "ne", "lt", "le", "gt", "ge", "maximum", "minimum"):
                cdt = torch.result_type(self.meta_arg(x), self.meta_arg(y))
                if op in ("maximum", "minimum"):
                    cdt = dt
                return g.add(op, (xn, yn), dt, cdt)
            if op in ("land", "lor", "lxor"):
                xb, yb = self._to_bool(xn), self._to_bool(yn)
                return self._bool_op({"land": "and", "lor": "or", "lxor": "xor"}[op], xb, yb)
            if op in ("and", "or", "xor") and dt == torch.bool:
                return self._bool_op(op, xn, yn)
            if op == "floordiv" and dt.is_floating_point is False and dt == torch.bool:
                raise _Unsupported("floor division of bools")
            return g.add(op, (xn, yn), dt)
        raise _Unsupported(f"`{name}`")

    def _to_bool(self, n: int) -> int:
        if self.g[n].dtype == torch.bool:
            return n
        return self.g.add("cast", (n,), torch.bool)

    def _bool_op(self, op: str, x: int, y: int) -> int:
        g = self.g
        for a, b in ((x, y), (y, x)):
            if g[a].is_const:
                v = bool(g[a].value)
                if op == "and":
                    return b if v else a
                if op == "or":
                    return a if v else b
                if op == "xor" and not v:
                    return b
        return g.add(op, (x, y), torch.bool)

    def _unary(self, op: str, x: int, dt: torch.dtype) -> int:
        g = self.g
        if op == "lnot":
            return g.add("not", (self._to_bool(x),), torch.bool)
        if op == "square":
            return g.add("mul", (x, x), dt)
        if op in ("floor", "ceil", "trunc", "round") and not g[x].dtype.is_floating_point:
            return x
        return g.add(op, (x,), dt)

    def _cast(self, base, args, kwargs, dt):
        x = self.value(args[0])
        if self.g[x].dtype == dt:
            return x
        return self.g.add("cast", (x,), dt)


# ---------------------------------------------------------------------------------------------
# tracing entry point
# ---------------------------------------------------------------------------------------------
def trace_mod(fn: Callable, kind: str) -> TraceResult:
    """Trace ``fn`` (a score_mod if ``kind == "score"``, else a mask_mod) into a graph."""
    g = Graph()
    tracer = _Tracer(g)
    names = ("b", "h", "q", "kv")
    deps = (DEP_B, DEP_H, DEP_Q, DEP_KV)
    inputs = []
    if kind == "score":
        full = DEP_S | DEP_Q | DEP_KV | DEP_B | DEP_H  # the score tile is [BM, BN]
        inputs.append(tracer.new_meta(g.input("score", torch.float32, full)))
    for nm, dp in zip(names, deps):
        inputs.append(tracer.new_meta(g.input(nm, torch.int64, dp)))
    name = mod_name(fn)
    try:
        with torch.no_grad(), tracer:
            out = fn(*inputs)
        if isinstance(out, (bool, int, float)):
            out = tracer.new_meta(g.const(out))
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"{kind}_mod {name} must return a 0-d tensor, got {type(out).__name__}."
            )
        o = tracer.value(out, "the result")
    except _Unsupported as e:
        raise UnsupportedModError(
            f"{kind}_mod {name}: {e} is not supported by the Triton mod compiler. Rewrite it "
            f"(e.g. with torch.where instead of Python control flow) {_BACKEND_HINT}."
        ) from None
    except UnsupportedModError:
        raise
    except (RuntimeError, IndexError, ValueError, NotImplementedError) as e:
        raise UnsupportedModError(
            f"{kind}_mod {name} could not be traced by the Triton mod compiler "
            f"({type(e).__name__}: {e}); {_BACKEND_HINT}."
        ) from e
    dt = g[o].dtype
    if kind == "mask" and dt != torch.bool:
        raise TypeError(
            f"mask_mod must return a bool tensor, got dtype {dt}; compare or combine with "
            "&, |, ~ (e.g. `return q_idx >= kv_idx`)."
        )
    if kind == "score" and not dt.is_floating_point:
        raise TypeError(f"score_mod must return a floating-point score, got dtype {dt}.")
    return TraceResult(kind, name, g, o, tracer.slots, tracer.tensors)


# ---------------------------------------------------------------------------------------------
# structural key of a mod
# ---------------------------------------------------------------------------------------------
_MAX_ITEMS = 64
_MAX_NODES = 2000
_LEAF_TYPES = (
    int,
    float,
    bool,
    str,
    bytes,
    complex,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
)


class _Walk:
    def __init__(self) -> None:
        self.paths: dict[int, tuple] = {}  # id(tensor) -> path
        self.seen: dict[int, tuple] = {}
        self.refs: list[Any] = []  # objects keyed by identity, kept alive
        self.consts: list[tuple[tuple, Any]] = []  # (path, value) of Python constants
        self.count = 0

    def walk(self, obj: Any, path: tuple) -> Any:  # noqa: C901
        self.count += 1
        if self.count > _MAX_NODES:
            raise _TooBig
        if isinstance(obj, _LEAF_TYPES):
            if path:
                self.consts.append((path, obj))
            if isinstance(obj, float):
                return ("f", repr(obj))
            return (type(obj).__name__, obj)
        if isinstance(obj, torch.Tensor):
            self.paths.setdefault(id(obj), path)
            return ("T", obj.dtype, obj.dim(), bool(obj.requires_grad), obj.device.type)
        oid = id(obj)
        if oid in self.seen:
            return ("ref", self.seen[oid])
        self.seen[oid] = path
        if isinstance(obj, types.ModuleType):
            return ("module", obj.__name__)
        if isinstance(obj, types.FunctionType):
            mod = getattr(obj, "__module__", "") or ""
            if mod == "torch" or mod.startswith("torch."):
                return self._ident(obj)
            return self._function(obj, path)
        if isinstance(obj, types.MethodType):
            return (
                "method",
                self.walk(obj.__func__, path + (("func",),)),
                self.walk(obj.__self__, path + (("self",),)),
            )
        if isinstance(obj, functools.partial):
            return (
                "partial",
                self.walk(obj.func, path + (("pfunc",),)),
                tuple(self.walk(a, path + (("parg", i),)) for i, a in enumerate(obj.args)),
                tuple(
                    (k, self.walk(v, path + (("pkw", k),))) for k, v in sorted(obj.keywords.items())
                ),
            )
        if isinstance(obj, (list, tuple)):
            if len(obj) > _MAX_ITEMS:
                return self._ident(obj)
            return (
                type(obj).__name__,
                tuple(self.walk(v, path + (("item", i),)) for i, v in enumerate(obj)),
            )
        if isinstance(obj, dict):
            if len(obj) > _MAX_ITEMS or not all(isinstance(k, (str, int)) for k in obj):
                return self._ident(obj)
            return (
                "dict",
                tuple(
                    (k, self.walk(v, path + (("key", k),)))
                    for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))
                ),
            )
        if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, type)):
            return self._ident(obj)
        if isinstance(obj, torch.nn.Module):
            # identity of the module, plus its own tensors and numbers (looked up again)
            items = {}
            items.update(obj.__dict__)
            items.update(obj._parameters)
            items.update(obj._buffers)
            return ("module_obj", self._ident(obj), self._attrs(items, path))
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            return ("obj", self._ident(obj), self._attrs(d, path))
        return self._ident(obj)

    def _attrs(self, items: dict, path: tuple) -> tuple:
        out = []
        for k in sorted(items):
            v = items[k]
            if isinstance(v, (torch.Tensor,) + _LEAF_TYPES):
                out.append((k, self.walk(v, path + (("attr", k),))))
        return tuple(out)

    def _ident(self, obj: Any) -> tuple:
        self.refs.append(obj)
        return ("id", id(obj))

    def _function(self, fn: types.FunctionType, path: tuple) -> tuple:
        code = fn.__code__
        cells = ()
        if fn.__closure__:
            parts = []
            for i, c in enumerate(fn.__closure__):
                try:
                    v = c.cell_contents
                except ValueError:
                    parts.append(("empty",))
                    continue
                parts.append(self.walk(v, path + (("cell", i),)))
            cells = tuple(parts)
        defaults = tuple(
            self.walk(v, path + (("dflt", i),)) for i, v in enumerate(fn.__defaults__ or ())
        )
        kwd = tuple(
            (k, self.walk(v, path + (("kwd", k),)))
            for k, v in sorted((fn.__kwdefaults__ or {}).items())
        )
        glob = []
        gl = fn.__globals__
        for nm in sorted(_code_names(code)):
            if nm in gl:
                glob.append((nm, self.walk(gl[nm], path + (("glob", nm),))))
        return ("fn", code, cells, defaults, kwd, tuple(glob))


class _TooBig(Exception):
    pass


@functools.lru_cache(maxsize=4096)
def _code_names(code: types.CodeType) -> frozenset:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return frozenset(names)


def structure(fn: Any) -> tuple[Any, dict[int, tuple], list[Any]] | None:
    """``(key, {id(tensor): path}, refs)`` of ``fn``, or ``None`` if it is too large to walk.

    ``refs`` are objects that are part of the key by identity; keep them alive as long as
    the key is used.
    """
    w = _Walk()
    try:
        key = w.walk(fn, ())
    except (_TooBig, RecursionError):
        return None
    return key, w.paths, w.refs


def constants(fn: Any) -> list[tuple[tuple, Any]] | None:
    """``[(path, value)]`` of the Python constants that :func:`structure` keys ``fn`` on
    (numbers, strings, None in closures, defaults, globals and attributes), or ``None`` if
    ``fn`` is too large to walk. Under torch.compile these become guards."""
    w = _Walk()
    try:
        w.walk(fn, ())
    except (_TooBig, RecursionError):
        return None
    return w.consts


def resolve_path(fn: Any, path: tuple) -> Any:
    """Follow a path recorded by :func:`structure` from ``fn``."""
    obj = fn
    for step in path:
        kind = step[0]
        if kind == "cell":
            obj = obj.__closure__[step[1]].cell_contents
        elif kind == "glob":
            obj = obj.__globals__[step[1]]
        elif kind == "dflt":
            obj = obj.__defaults__[step[1]]
        elif kind == "kwd":
            obj = obj.__kwdefaults__[step[1]]
        elif kind == "func":
            obj = obj.__func__
        elif kind == "self":
            obj = obj.__self__
        elif kind == "pfunc":
            obj = obj.func
        elif kind == "parg":
            obj = obj.args[step[1]]
        elif kind == "pkw":
            obj = obj.keywords[step[1]]
        elif kind in ("item", "key"):
            obj = obj[step[1]]
        elif kind == "attr":  # getattr (not __dict__) so that dynamo can trace it
            obj = getattr(obj, step[1])
        else:  # pragma: no cover - paths are produced above
            raise KeyError(step)
    return obj
