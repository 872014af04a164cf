"""Lower a mod graph to Triton statements over tiles.

Tile conventions (see hf_flexattn/INTERFACES.md): ``b``, ``h`` are int32 scalars, ``q`` is
``[BM, 1]`` int32, ``kv`` is ``[1, BN]`` int32, ``score`` is fp32 ``[BM, BN]``.  Values take
the broadcast shape of the inputs they depend on.  With ``transposed=True`` (the dK/dV
kernel's orientation) ``q`` is ``[1, BM]``, ``kv`` is ``[BN, 1]`` and tiles are ``[BN, BM]``:
only full-tile shapes and the axes of gradient reductions depend on the orientation.

Lowered types: ``bool -> tl.int1``; every float dtype is computed in fp32 (float64 captured
tensors are loaded and converted to fp32: results can differ from torch's float64 math in
the last fp32 bit; float16/bfloat16 results are rounded to their dtype after each
operation, as torch does); ``int64 -> tl.int64``, but a value whose interval (graph.py)
proves that it and its operands fit in int32 is computed in int32, which gives the same
bits; int32 stays int32; int8/int16/uint8 are computed in int32 and wrapped back.

Python/torch integer semantics: ``//`` rounds toward -inf and ``%`` takes the divisor's
sign; Triton truncates, so a correction is emitted unless both operands are provably
non-negative.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch

from .graph import DEP_KV, DEP_Q, INT32, Graph, Node, fits

__all__ = ["SlotParams", "Emitter", "interpreting"]

_TL = {"i1": "tl.int1", "i32": "tl.int32", "i64": "tl.int64", "f32": "tl.float32"}
_NARROW = {
    torch.int8: "tl.int8",
    torch.int16: "tl.int16",
    torch.uint8: "tl.uint8",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
}
_CMP = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_ARITH = {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "and": "&",
    "or": "|",
    "xor": "^",
    "shl": "<<",
    "shr": ">>",
}
_NAN_ALL = "propagate_nan=tl.PropagateNan.ALL"


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def base_lt(dt: torch.dtype) -> str:
    if dt == torch.bool:
        return "i1"
    if dt.is_floating_point:
        return "f32"
    if dt == torch.int64:
        return "i64"
    return "i32"


def literal(value, lt: str) -> str:
    if lt == "i1":
        return "True" if bool(value) else "False"
    if lt in ("i32", "i64"):
        return str(int(value))
    v = float(value)
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(v)


@dataclass
class SlotParams:
    """Kernel parameter names of one captured tensor."""

    ptr: str
    strides: list[str]
    sizes: list[str]
    large: bool = False  # offsets may pass 2**31: compute them in int64
    grad_ptr: str | None = None


class Emitter:
    """Emit Triton statements for graph nodes, each node once."""

    def __init__(
        self,
        g: Graph,
        prefix: str,
        inputs: dict[str, str],
        slots: list[SlotParams],
        indent: str,
        interp: bool | None = None,
        transposed: bool = False,
    ) -> None:
        self.g = g
        self.transposed = bool(transposed)
        self.p = prefix
        self.inputs = inputs
        self.slots = slots
        self.indent = indent
        self.interp = interpreting() if interp is None else interp
        self.lines: list[str] = []
        self.lt: dict[int, str] = {}
        self.name: dict[int, str] = {}
        self.convs: dict[tuple[int, str], str] = {}
        self.index: dict[int, tuple[str, str | None, list[str], bool]] = {}
        self.wrapped: dict[tuple, str] = {}
        self.masks: dict[str, str] = {}
        self.tmp = 0
        if not self.interp:
            try:  # make `tl.extra.libdevice` resolvable from the kernel's globals
                importlib.import_module("triton.language.extra.libdevice")
            except ImportError:  # pragma: no cover - triton missing: code is never run
                pass

    # ------------------------------------------------------------------ helpers
    def line(self, s: str) -> None:
        self.lines.append(self.indent + s)

    def fresh(self, tag: str) -> str:
        self.tmp += 1
        return f"{self.p}{tag}{self.tmp}"

    def text(self) -> str:
        return "\n".join(self.lines) + ("\n" if self.lines else "")

    def node_lt(self, i: int) -> str:
        n = self.g[i]
        if n.is_const:
            return base_lt(n.dtype)
        self.ensure(i)
        return self.lt[i]

    def operand(self, i: int, lt: str) -> str:
        """The value of node ``i`` as an expression of lowered type ``lt``."""
        n = self.g[i]
        if n.is_const:
            return literal(n.value, lt)
        self.ensure(i)
        have = self.lt[i]
        if have == lt:
            return self.name[i]
        key = (i, lt)
        if key not in self.convs:
            nm = f"{self.p}{i}_{lt}"
            self.line(f"{nm} = {self._conv(self.name[i], have, lt)}")
            self.convs[key] = nm
        return self.convs[key]

    @staticmethod
    def _conv(e: str, have: str, want: str) -> str:
        if have == want:
            return e
        if want == "i1":
            return f"({e} != 0)"
        return f"{e}.to({_TL[want]})"

    def ensure(self, i: int) -> None:
        """Emit node ``i`` (and what it needs) if not emitted yet."""
        if i in self.lt:
            return
        stack = [i]
        while stack:
            j = stack[-1]
            if j in self.lt:
                stack.pop()
                continue
            todo = [a for a in self.g[j].args if a not in self.lt and not self.g[a].is_const]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            self._emit(self.g[j])

    # ------------------------------------------------------------------ type choice
    def _compute_lt(self, n: Node, operands: tuple[int, ...]) -> str:
        lt = base_lt(n.cdtype)
        if lt != "i64":
            return lt
        for a in operands:
            an = self.g[a]
            if not fits(an.rng, INT32):
                return "i64"
            if not an.is_const and self.node_lt(a) == "i64":
                return "i64"
        if n.dtype != torch.bool and not fits(n.rng, INT32):
            return "i64"
        return "i32"

    # ------------------------------------------------------------------ emission
    def _emit(self, n: Node) -> None:  # noqa: C901 - one case per op
        op, g = n.op, self.g
        nm = f"{self.p}{n.id}"
        if op in ("score", "b", "h", "q", "kv", "gout"):
            expr = self.inputs[op]
            lt = "f32" if op in ("score", "gout") else "i32"
            if expr.isidentifier():
                self.name[n.id], self.lt[n.id] = expr, lt
            else:
                self.line(f"{nm} = {expr}")
                self.name[n.id], self.lt[n.id] = nm, lt
            return
        if op == "load":
            self._emit_load(n, nm)
            return
        if op == "cast":
            src = n.args[0]
            have = self.node_lt(src)
            want = base_lt(n.dtype)
            if want == "i64" and have in ("i32", "i1") and fits(n.rng, INT32):
                want = "i32"
            expr = self._conv(self.operand(src, have), have, want)
            if have != "i1" and want == "i32" and n.dtype in _NARROW:
                expr = f"{self.operand(src, have)}.to({_NARROW[n.dtype]}).to(tl.int32)"
            src_dt = g[src].dtype
            rnd = n.dtype in (torch.float16, torch.bfloat16) and src_dt != n.dtype
            self._finish(n, nm, expr, want, round_float=rnd)
            return
        args = n.args
        if op in _CMP:
            ct = self._compute_lt(n, args)
            x, y = (self.operand(a, ct) for a in args)
            self._finish(n, nm, f"{x} {_CMP[op]} {y}", "i1")
            return
        ct = self._compute_lt(n, args)
        if op == "where":
            c = self.operand(args[0], "i1")
            x, y = self.operand(args[1], ct), self.operand(args[2], ct)
            expr = f"tl.where({c}, {x}, {y})"
            if g[args[1]].is_const and g[args[2]].is_const and ct == "i64":
                expr += ".to(tl.int64)"
            self._finish(n, nm, expr, ct)
            return
        xs = [self.operand(a, ct) for a in args]
        expr = self._arith(n, ct, xs)
        self._finish(n, nm, expr, ct)

    def _finish(
        self, n: Node, nm: str, expr: str, lt: str, round_float: bool | None = None
    ) -> None:
        if round_float is None:
            round_float = n.dtype in (torch.float16, torch.bfloat16)
        if lt == "f32" and round_float:
            expr = f"({expr}).to({_NARROW[n.dtype]}).to(tl.float32)"
        elif lt == "i32" and n.dtype in _NARROW and n.op != "cast":
            expr = f"({expr}).to({_NARROW[n.dtype]}).to(tl.int32)"  # torch wraps narrow ints
        self.line(f"{nm} = {expr}")
        self.name[n.id], self.lt[n.id] = nm, lt

    def _nonneg(self, i: int) -> bool:
        r = self.g[i].rng
        return r is not None and r[0] >= 0

    def _posconst(self, i: int) -> bool:
        n = self.g[i]
        return n.is_const and n.value > 0

    def _arith(self, n: Node, ct: str, xs: list[str]) -> str:  # noqa: C901
        op = n.op
        fl = ct == "f32"
        if op in ("and", "or", "xor") and ct == "i1":
            return self._bool_op(op, n.args, xs)
        if op in _ARITH:
            if op in ("and", "or", "xor", "shl", "shr") and fl:
                raise TypeError(f"bitwise `{op}` on floats")
            return f"{xs[0]} {_ARITH[op]} {xs[1]}"
        x = xs[0]
        if op == "div":
            return f"{x} / {xs[1]}"
        if op in ("floordiv", "mod"):
            return self._floor_mod(n, ct, x, xs[1])
        if op == "truncdiv":
            return f"{x} // {xs[1]}" if not fl else self._trunc(f"({x} / {xs[1]})")
        if op == "fmod":
            return f"{x} % {xs[1]}"
        if op == "neg":
            return f"-{x}"
        if op == "not":
            return f"~{x}"
        if op == "abs":
            return f"tl.abs({x})" if ct != "i1" else x
        if op in (
            "exp",
            "exp2",
            "log",
            "log2",
            "sin",
            "cos",
            "sqrt",
            "rsqrt",
            "erf",
            "floor",
            "ceil",
            "sigmoid",
        ):
            return f"tl.{op}({x})"
        if op == "reciprocal":
            return f"1.0 / {x}"
        if op == "relu":
            return f"tl.maximum({x}, 0.0, {_NAN_ALL})" if fl else f"tl.maximum({x}, 0)"
        if op == "tanh":
            if not self.interp:
                return f"tl.extra.libdevice.tanh({x})"
            t = self.fresh("t")
            self.line(f"{t} = tl.exp(-2.0 * tl.abs({x}))")
            return f"tl.where({x} < 0, -1.0, 1.0) * ((1.0 - {t}) / (1.0 + {t}))"
        if op == "trunc":
            return self._trunc(x)
        if op == "round":
            if not self.interp:
                return f"tl.extra.libdevice.rint({x})"
            f = self.fresh("f")
            self.line(f"{f} = tl.floor({x})")
            return (
                f"tl.where({x} - {f} > 0.5, {f} + 1.0, tl.where({x} - {f} < 0.5, {f}, "
                f"{f} + ({f} % 2.0 != 0).to(tl.float32)))"
            )
        if op == "sign":
            if fl:
                return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
            if ct == "i1":
                return x
            return f"({x} > 0).to({_TL[ct]}) - ({x} < 0).to({_TL[ct]})"
        if op in ("maximum", "minimum", "clamp_min", "clamp_max"):
            f = "tl.maximum" if op in ("maximum", "clamp_min") else "tl.minimum"
            if ct == "i1":
                return f"{x} | {xs[1]}" if f == "tl.maximum" else f"{x} & {xs[1]}"
            return f"{f}({x}, {xs[1]}, {_NAN_ALL})" if fl else f"{f}({x}, {xs[1]})"
        if op == "clamp":
            if fl:
                return f"tl.minimum(tl.maximum({x}, {xs[1]}, {_NAN_ALL}), {xs[2]}, {_NAN_ALL})"
            return f"tl.minimum(tl.maximum({x}, {xs[1]}), {xs[2]})"
        if op == "pow":
            return self._pow(n, ct, x, xs[1])
        raise TypeError(f"no lowering for op {op!r}")

    def is_block(self, i: int) -> bool:
        return bool(self.g[i].deps & (DEP_Q | DEP_KV)) and not self.g[i].is_const

    def _bool_op(self, op: str, args: tuple[int, ...], xs: list[str]) -> str:
        # a 0-d bool combined with a tile goes through tl.where: same cost, and Triton's
        # interpreter mis-types `tile & scalar` for int1
        blk = [self.is_block(a) for a in args]
        if blk[0] == blk[1]:
            return f"{xs[0]} {_ARITH[op]} {xs[1]}"
        s, t = (xs[0], xs[1]) if blk[1] else (xs[1], xs[0])
        if op == "and":
            return f"tl.where({s}, {t}, False)"
        if op == "or":
            return f"tl.where({s}, True, {t})"
        return f"tl.where({s}, ~{t}, {t})"

    @staticmethod
    def and_terms(terms: list[tuple[str, bool]]) -> str | None:
        """``&`` of mask terms given as ``(expr, is_tile)``."""
        tiles = [t for t, b in terms if b]
        scalars = [t for t, b in terms if not b]
        if not terms:
            return None
        if not tiles or not scalars:
            return " & ".join(tiles or scalars)
        return f"tl.where({' & '.join(scalars)}, {' & '.join(tiles)}, False)"

    def _trunc(self, x: str) -> str:
        if not self.interp:
            return f"tl.extra.libdevice.trunc({x})"
        return f"tl.where({x} < 0, tl.ceil({x}), tl.floor({x}))"

    def _floor_mod(self, n: Node, ct: str, x: str, y: str) -> str:
        a, b = n.args
        if ct != "f32":
            if self._nonneg(a) and self._nonneg(b):
                return f"{x} // {y}" if n.op == "floordiv" else f"{x} % {y}"
            r = self.fresh("r")
            self.line(f"{r} = {x} % {y}")
            if self._posconst(b):
                fix = f"{r} < 0"
            else:
                fix = f"({r} != 0) & (({r} < 0) != ({y} < 0))"
            if n.op == "floordiv":
                return f"tl.where({fix}, {x} // {y} - 1, {x} // {y})"
            return f"tl.where({fix}, {r} + {y}, {r})"
        r = self.fresh("r")
        self.line(f"{r} = {x} % {y}")
        fix = f"({r} != 0) & (({r} < 0) != ({y} < 0))"
        if n.op == "mod":
            return f"tl.where({fix}, {r} + {y}, {r})"
        d = self.fresh("d")
        self.line(f"{d} = ({x} - {r}) / {y}")
        self.line(f"{d} = tl.where({fix}, {d} - 1.0, {d})")
        f = self.fresh("f")
        self.line(f"{f} = tl.floor({d})")
        self.line(f"{f} = tl.where({d} - {f} > 0.5, {f} + 1.0, {f})")
        return f"tl.where({y} == 0, {x} / {y}, {f})"

    def _ipow(self, x: str, k: int) -> str:
        if k == 0:
            return "1"
        if k == 1:
            return x
        if k <= 4:
            return " * ".join([x] * k)
        h = self.fresh("p")
        self.line(f"{h} = {self._ipow(x, k // 2)}")
        return f"{h} * {h}" + (f" * {x}" if k % 2 else "")

    def _pow(self, n: Node, ct: str, x: str, y: str) -> str:
        a, b = n.args
        en, bn = self.g[b], self.g[a]
        if ct != "f32":
            if en.is_const and int(en.value) >= 0:
                k = int(en.value)
                if k == 0:
                    one = f"tl.where({x} == {x}, 1, 1)"
                    return one + ".to(tl.int64)" if ct == "i64" else one
                return self._ipow(x, k)
            raise TypeError("integer pow needs a non-negative constant exponent")
        if en.is_const:
            c = float(en.value)
            if c == 0:
                return f"tl.where({x} == {x}, 1.0, 1.0)"
            if c == 0.5:
                return f"tl.sqrt({x})"
            if c == -0.5:
                return f"tl.rsqrt({x})"
            if c.is_integer() and abs(c) <= 16:
                p = self._ipow(x, int(abs(c)))
                return p if c > 0 else f"1.0 / ({p})"
            if not self.interp:
                return f"tl.extra.libdevice.pow({x}, {y})"
            if c.is_integer():
                odd = int(c) % 2 == 1
                mag = f"tl.exp2({y} * tl.log2(tl.abs({x})))"
                return f"tl.where({x} < 0, {'-' if odd else ''}{mag}, {mag})"
            return f"tl.exp2({y} * tl.log2({x}))"
        if bn.is_const and float(bn.value) > 0:
            c = float(bn.value)
            if c == 2.0:
                return f"tl.exp2({y})"
            if not self.interp:
                return f"tl.extra.libdevice.pow({x}, {y})"
            return f"tl.exp2({y} * {literal(math.log2(c), 'f32')})"
        if not self.interp:
            return f"tl.extra.libdevice.pow({x}, {y})"
        m = self.fresh("m")
        self.line(f"{m} = tl.exp2({y} * tl.log2(tl.abs({x})))")
        yi = f"({y} == tl.floor({y}))"
        odd = f"({yi} & ({y} % 2.0 != 0))"
        return (
            f"tl.where({y} == 0, 1.0, tl.where({x} < 0, tl.where({yi}, "
            f'tl.where({odd}, -{m}, {m}), float("nan")), {m}))'
        )

    # ------------------------------------------------------------------ captured tensors
    def load_index(self, i: int) -> tuple[str, str | None, list[str], bool]:
        """``(offset, mask name or None, wrapped index exprs, mask is a tile)`` of load ``i``."""
        if i in self.index:
            return self.index[i]
        n = self.g[i]
        sp = self.slots[n.attr[0]]
        terms, masks, idxs = [], [], []
        for d, a in enumerate(n.args):
            an = self.g[a]
            size = sp.sizes[d]
            if an.is_const:
                c = int(an.value)
                if c >= 0:
                    idx = str(c)
                    masks.append((f"({c} < {size})", False))
                else:
                    idx = f"({size} - {-c})"
                    masks.append((f"({size} >= {-c})", False))
            else:
                lt = self.node_lt(a)
                if lt == "i1":
                    lt = "i32"
                if sp.large:
                    lt = "i64"
                v = self.operand(a, lt)
                blk = self.is_block(a)
                if self._nonneg(a):
                    idx = v
                    masks.append((f"({v} < {size})", blk))
                else:
                    wkey = (a, lt, size)
                    if wkey not in self.wrapped:
                        w = self.fresh("i")
                        self.line(f"{w} = tl.where({v} < 0, {v} + {size}, {v})")
                        self.wrapped[wkey] = w
                    idx = self.wrapped[wkey]
                    masks.append((f"({idx} >= 0) & ({idx} < {size})", blk))
            idxs.append(idx)
            terms.append(f"{idx} * {sp.strides[d]}")
        off = " + ".join(terms) if terms else ""
        mask = None
        expr = self.and_terms(masks)
        if expr is not None:
            mask = self.masks.get(expr)
            if mask is None:
                mask = f"{self.p}m{i}"
                self.line(f"{mask} = {expr}")
                self.masks[expr] = mask
        blk = any(b for _, b in masks)
        self.index[i] = (off, mask, idxs, blk)
        return self.index[i]

    def _emit_load(self, n: Node, nm: str) -> None:
        sp = self.slots[n.attr[0]]
        off, mask, _, _ = self.load_index(n.id)
        ptr = f"{sp.ptr} + {off}" if off else sp.ptr
        if mask:
            expr = f"tl.load({ptr}, mask={mask}, other=0)"
        else:
            expr = f"tl.load({ptr})"
        lt = base_lt(n.dtype)
        if n.dtype.is_floating_point and n.dtype != torch.float32:
            expr += ".to(tl.float32)"
        elif lt == "i32" and n.dtype != torch.int32:
            expr += ".to(tl.int32)"
        self.line(f"{nm} = {expr}")
        self.name[n.id], self.lt[n.id] = nm, lt

    def emit_grad_atomic(self, load: int, value: int, valid: str) -> None:
        """``tl.atomic_add`` ``value`` (fp32, full tile) into the grad buffer of a load."""
        n = self.g[load]
        sp = self.slots[n.attr[0]]
        _, mask, idxs, mask_blk = self.load_index(load)
        v = self.operand(value, "f32")
        # contiguous offsets into the fp32 gradient buffer
        off = ""
        for d, idx in enumerate(idxs):
            off = idx if d == 0 else f"({off}) * {sp.sizes[d]} + {idx}"
        gp = f"{sp.grad_ptr} + {off}" if off else sp.grad_ptr
        deps = 0
        for a in n.args:
            deps |= self.g[a].deps
        has_q, has_kv = bool(deps & DEP_Q), bool(deps & DEP_KV)
        if has_q and has_kv:
            m = self.and_terms([(valid, True)] + ([(mask, mask_blk)] if mask else []))
            self.line(f'tl.atomic_add({gp}, {v}, mask={m}, sem="relaxed")')
            return
        gv = self.fresh("g")
        self.line(f"{gv} = tl.where({valid}, {v}, 0.0)")
        # the kv axis is 1 in the normal orientation ([BM, BN]) and 0 when transposed
        kv_axis, q_axis = (0, 1) if self.transposed else (1, 0)
        if has_q:
            red = f"tl.sum({gv}, axis={kv_axis}, keep_dims=True)"
        elif has_kv:
            red = f"tl.sum({gv}, axis={q_axis}, keep_dims=True)"
        else:
            red = f"tl.sum(tl.sum({gv}, axis=1), axis=0)"
        mk = f", mask={mask}" if mask else ""
        self.line(f'tl.atomic_add({gp}, {red}{mk}, sem="relaxed")')

    def assign_full(self, out: str, i: int, lt: str, q: str, kv: str) -> None:
        """``out = value of node i`` as a ``[BM, BN]`` (transposed: ``[BN, BM]``) tile."""
        n = self.g[i]
        if self.transposed:
            shape = f"({kv}.shape[0], {q}.shape[1])"
        else:
            shape = f"({q}.shape[0], {kv}.shape[1])"
        if n.is_const:
            self.line(f"{out} = tl.full({shape}, {literal(n.value, lt)}, {_TL[lt]})")
            return
        v = self.operand(i, lt)
        if (n.deps & DEP_Q) and (n.deps & DEP_KV):
            self.line(f"{out} = {v}")
        else:
            self.line(f"{out} = tl.broadcast_to({v}, {shape})")
