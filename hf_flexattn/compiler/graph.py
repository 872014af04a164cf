"""The mod graph: a small SSA list of scalar operations with torch dtypes.

Every node stands for one 0-d value of a mod evaluated at a single ``(b, h, q_idx, kv_idx)``
(torch's vmap semantics).  ``dtype`` is the torch dtype of the value, ``cdtype`` the dtype in
which torch computes the operation (they differ for comparisons, whose operands are promoted
to ``cdtype`` and whose result is ``bool``).  ``deps`` is a bit set of the inputs the value
depends on (used for tile shapes: ``q`` gives ``[BM, 1]``, ``kv`` gives ``[1, BN]``), ``rng``
an interval ``(lo, hi)`` that holds every value of an integer/bool node (used to compute
int64 values in int32 when that cannot change the result, and to skip index wrapping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DEP_B", "DEP_H", "DEP_Q", "DEP_KV", "DEP_S", "DEP_G", "Graph", "Node"]

DEP_B, DEP_H, DEP_Q, DEP_KV, DEP_S, DEP_G = 1, 2, 4, 8, 16, 32

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
_INPUT_RANGE = (0, 2**31 - 1)  # b, h, q_idx, kv_idx are int32 in the kernels


def dtype_range(dt: torch.dtype) -> tuple[int, int] | None:
    """The value range of an integer/bool dtype, ``None`` for floats."""
    if dt == torch.bool:
        return (0, 1)
    if dt.is_floating_point or dt.is_complex:
        return None
    info = torch.iinfo(dt)
    return (int(info.min), int(info.max))


def fits(rng: tuple[int, int] | None, bounds: tuple[int, int]) -> bool:
    return rng is not None and bounds[0] <= rng[0] and rng[1] <= bounds[1]


@dataclass(eq=False)
class Node:
    id: int
    op: str
    args: tuple[int, ...]
    dtype: torch.dtype
    cdtype: torch.dtype
    deps: int
    attr: tuple = ()
    rng: tuple[int, int] | None = None

    @property
    def is_const(self) -> bool:
        return self.op == "const"

    @property
    def value(self):
        return self.attr[0]


def _const_sig(v) -> tuple:
    # repr keeps -0.0 / nan / inf distinct and makes nan compare equal to itself
    return (type(v).__name__, repr(v))


class Graph:
    """Append-only node list with common-subexpression elimination."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self._cse: dict[tuple, int] = {}

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    # ------------------------------------------------------------------ building
    def add(
        self,
        op: str,
        args: tuple[int, ...] | list[int],
        dtype: torch.dtype,
        cdtype: torch.dtype | None = None,
        attr: tuple = (),
        deps: int | None = None,
    ) -> int:
        args = tuple(args)
        cdtype = cdtype or dtype
        sig_attr = tuple(_const_sig(a) if isinstance(a, (int, float, bool)) else a for a in attr)
        key = (op, args, dtype, cdtype, sig_attr)
        hit = self._cse.get(key)
        if hit is not None:
            return hit
        if deps is None:
            deps = 0
            for a in args:
                deps |= self.nodes[a].deps
        n = Node(len(self.nodes), op, args, dtype, cdtype, deps, attr)
        n.rng = self._range(n)
        self.nodes.append(n)
        self._cse[key] = n.id
        return n.id

    def const(self, value, dtype: torch.dtype | None = None) -> int:
        if dtype is None:
            dtype = (
                torch.bool
                if isinstance(value, bool)
                else torch.int64
                if isinstance(value, int)
                else torch.float32
            )
        if dtype == torch.bool:
            value = bool(value)
        elif dtype.is_floating_point:
            value = float(value)
        else:
            value = int(value)
        return self.add("const", (), dtype, attr=(value,), deps=0)

    def input(self, name: str, dtype: torch.dtype, dep: int) -> int:
        return self.add(name, (), dtype, deps=dep)

    def signature(self, outputs: tuple[int, ...]) -> tuple:
        """Hashable structural description of the nodes reachable from ``outputs``."""
        live = sorted(self.live(outputs))
        remap = {old: new for new, old in enumerate(live)}
        sig = []
        for i in live:
            n = self.nodes[i]
            attr = tuple(_const_sig(a) if isinstance(a, (int, float, bool)) else a for a in n.attr)
            sig.append((n.op, tuple(remap[a] for a in n.args), n.dtype, n.cdtype, attr))
        return (tuple(sig), tuple(remap[o] for o in outputs))

    def live(self, outputs) -> set[int]:
        seen: set[int] = set()
        stack = [o for o in outputs if o is not None]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.nodes[i].args)
        return seen

    # ------------------------------------------------------------------ intervals
    def _range(self, n: Node) -> tuple[int, int] | None:
        full = dtype_range(n.dtype)
        if full is None:
            return None
        r = self._raw_range(n)
        if r is None or not fits(r, full):
            return full  # unknown, or may wrap around
        return (int(r[0]), int(r[1]))

    def _raw_range(self, n: Node):  # noqa: C901 - one case per op
        op = n.op
        if op in ("b", "h", "q", "kv"):
            return _INPUT_RANGE
        if op == "const":
            return (int(n.value), int(n.value))
        if n.dtype == torch.bool:
            return (0, 1)
        a = [self.nodes[i].rng for i in n.args]
        if any(r is None for r in a):
            return None
        if op == "cast":
            return a[0]
        if op == "add":
            return (a[0][0] + a[1][0], a[0][1] + a[1][1])
        if op == "sub":
            return (a[0][0] - a[1][1], a[0][1] - a[1][0])
        if op == "neg":
            return (-a[0][1], -a[0][0])
        if op == "mul":
            p = [x * y for x in a[0] for y in a[1]]
            return (min(p), max(p))
        if op == "abs":
            lo, hi = a[0]
            if lo >= 0:
                return (lo, hi)
            if hi <= 0:
                return (-hi, -lo)
            return (0, max(-lo, hi))
        if op in ("maximum", "clamp_min"):
            return (max(a[0][0], a[1][0]), max(a[0][1], a[1][1]))
        if op in ("minimum", "clamp_max"):
            return (min(a[0][0], a[1][0]), min(a[0][1], a[1][1]))
        if op == "clamp":
            return (min(max(a[0][0], a[1][0]), a[2][0]), min(max(a[0][1], a[1][1]), a[2][1]))
        if op == "where":
            return (min(a[1][0], a[2][0]), max(a[1][1], a[2][1]))
        if op == "sign":
            return (-1, 1)
        if op in ("floordiv", "truncdiv"):
            (al, ah), (bl, bh) = a
            if bl > 0 or bh < 0:
                corners = []
                for x in (al, ah):
                    for y in (bl, bh):
                        corners.append(math.floor(x / y) if op == "floordiv" else int(x / y))
                # floor(x / y) is monotone in x and y on each side of 0 for y
                return (min(corners) - 1, max(corners) + 1)
            m = max(abs(al), abs(ah))
            return (-m - 1, m + 1)
        if op in ("mod", "fmod"):
            (al, ah), (bl, bh) = a
            m = max(abs(bl), abs(bh))
            if op == "mod":
                if bl > 0:
                    return (0, bh - 1) if al < 0 else (0, min(ah, bh - 1))
                if bh < 0:
                    return (bl + 1, 0)
                return (-m, m)
            if al >= 0:
                return (0, min(ah, max(m - 1, 0)))
            return (-m, m)
        if op in ("and", "or", "xor", "not"):
            if all(r[0] >= 0 for r in a) and op != "not":
                if op == "and":
                    return (0, min(r[1] for r in a))
                top = max(r[1] for r in a)
                return (0, (1 << top.bit_length()) - 1)
            if all(fits(r, INT32) for r in a):
                return INT32
            return None
        if op in ("shl", "shr"):
            kn = self.nodes[n.args[1]]
            if kn.is_const and 0 <= kn.value < 63:
                k = kn.value
                if op == "shl":
                    return (a[0][0] << k, a[0][1] << k)
                return (a[0][0] >> k, a[0][1] >> k)
            return None
        if op == "pow":
            en = self.nodes[n.args[1]]
            if en.is_const and isinstance(en.value, int) and en.value >= 0:
                k = en.value
                lo, hi = a[0]
                m = max(abs(lo), abs(hi))
                if m**k > 2**64:
                    return None
                if lo >= 0:
                    return (lo**k, hi**k)
                return (-(m**k), m**k)
            return None
        if op in ("round", "floor", "ceil", "trunc"):
            return a[0]
        return None
