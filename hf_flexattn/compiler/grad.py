"""Reverse-mode derivative of a traced score_mod (the joint graph).

:func:`build_backward` appends adjoint nodes to the forward graph: seeded with the input
``gout`` (= dLoss/d(score_mod output), fp32 ``[BM, BN]``), it gives dLoss/d(score) and
dLoss/d(value loaded from each captured tensor that needs a gradient).  The rules follow
torch's autograd formulas, including its tie rules: ``clamp`` passes the gradient where
``min <= x <= max``; ``maximum``/``minimum`` split ties half and half; ``where`` sends the
gradient to the chosen branch.  Integer and bool values have no gradient; rounding ops
(``floor``, ``round`` ...) have a zero gradient.  All adjoints are computed in fp32.
"""

from __future__ import annotations

import math

import torch

from .graph import Graph

__all__ = ["build_backward"]

F = torch.float32
_DIFF = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "abs",
    "exp",
    "exp2",
    "log",
    "log2",
    "tanh",
    "sigmoid",
    "sqrt",
    "rsqrt",
    "pow",
    "where",
    "clamp",
    "clamp_min",
    "clamp_max",
    "maximum",
    "minimum",
    "cast",
    "sin",
    "cos",
    "erf",
    "reciprocal",
    "relu",
    "mod",
    "fmod",
}


class _B:
    def __init__(self, g: Graph) -> None:
        self.g = g

    def c(self, v: float) -> int:
        return self.g.const(float(v), F)

    def op(self, name: str, *args: int) -> int:
        return self.g.add(name, args, F)

    def mul(self, a: int, b: int) -> int:
        return self.op("mul", a, b)

    def div(self, a: int, b: int) -> int:
        return self.op("div", a, b)

    def neg(self, a: int) -> int:
        return self.op("neg", a)

    def sub(self, a: int, b: int) -> int:
        return self.op("sub", a, b)

    def cmp(self, name: str, a: int, b: int) -> int:
        da, db = self.g[a].dtype, self.g[b].dtype
        cdt = F if (da.is_floating_point or db.is_floating_point) else torch.promote_types(da, db)
        return self.g.add(name, (a, b), torch.bool, cdt)

    def band(self, a: int, b: int) -> int:
        return self.g.add("and", (a, b), torch.bool)

    def bor(self, a: int, b: int) -> int:
        return self.g.add("or", (a, b), torch.bool)

    def where(self, c: int, a: int, b: int) -> int:
        return self.g.add("where", (c, a, b), F)


def build_backward(
    g: Graph, out: int, grad_slots: set[int]
) -> tuple[int | None, list[tuple[int, int]]]:
    """Append the backward of ``out`` to ``g``.

    Returns ``(grad_score node or None, [(load node, adjoint node), ...])`` for the loads of
    slots in ``grad_slots``.  The adjoint input node is ``g.input("gout")``.
    """
    from .graph import DEP_G

    nodes = g.nodes[: out + 1]
    req = [False] * len(nodes)
    for n in nodes:
        if not n.dtype.is_floating_point:
            continue
        if n.op == "score" or (n.op == "load" and n.attr[0] in grad_slots):
            req[n.id] = True
        elif n.op in _DIFF and any(req[a] for a in n.args):
            if n.op == "cast" and not g[n.args[0]].dtype.is_floating_point:
                continue
            req[n.id] = True
    if not req[out]:
        return None, []
    b = _B(g)
    gout = g.add("gout", (), F, deps=DEP_G | 0b1111 | 16)
    adj: dict[int, int] = {out: gout}
    zero = b.c(0.0)

    def acc(i: int, v: int) -> None:
        if not req[i]:
            return
        adj[i] = v if i not in adj else b.op("add", adj[i], v)

    for n in reversed(nodes):
        if n.id not in adj or n.op in ("score", "load"):
            continue
        gi = adj[n.id]
        a = n.args
        op = n.op
        y = n.id
        if op == "add":
            acc(a[0], gi)
            acc(a[1], gi)
        elif op == "sub":
            acc(a[0], gi)
            acc(a[1], b.neg(gi))
        elif op == "mul":
            acc(a[0], b.mul(gi, a[1]))
            acc(a[1], b.mul(gi, a[0]))
        elif op == "div":
            acc(a[0], b.div(gi, a[1]))
            if req[a[1]]:
                acc(a[1], b.div(b.mul(b.neg(gi), a[0]), b.mul(a[1], a[1])))
        elif op == "neg":
            acc(a[0], b.neg(gi))
        elif op == "abs":
            acc(a[0], b.mul(gi, b.op("sign", a[0])))
        elif op == "exp":
            acc(a[0], b.mul(gi, y))
        elif op == "exp2":
            acc(a[0], b.mul(b.mul(gi, y), b.c(math.log(2.0))))
        elif op == "log":
            acc(a[0], b.div(gi, a[0]))
        elif op == "log2":
            acc(a[0], b.div(gi, b.mul(a[0], b.c(math.log(2.0)))))
        elif op == "tanh":
            acc(a[0], b.mul(gi, b.sub(b.c(1.0), b.mul(y, y))))
        elif op == "sigmoid":
            acc(a[0], b.mul(gi, b.mul(b.sub(b.c(1.0), y), y)))
        elif op == "sqrt":
            acc(a[0], b.div(gi, b.mul(b.c(2.0), y)))
        elif op == "rsqrt":
            acc(a[0], b.mul(b.mul(gi, b.c(-0.5)), b.mul(b.mul(y, y), y)))
        elif op == "sin":
            acc(a[0], b.mul(gi, b.op("cos", a[0])))
        elif op == "cos":
            acc(a[0], b.mul(gi, b.neg(b.op("sin", a[0]))))
        elif op == "erf":
            e = b.op("exp", b.neg(b.mul(a[0], a[0])))
            acc(a[0], b.mul(gi, b.mul(b.c(2.0 / math.sqrt(math.pi)), e)))
        elif op == "reciprocal":
            acc(a[0], b.mul(b.neg(gi), b.mul(y, y)))
        elif op == "relu":
            acc(a[0], b.where(b.cmp("gt", y, zero), gi, zero))
        elif op == "pow":
            _pow_rule(g, b, acc, req, n, gi, zero)
        elif op == "where":
            acc(a[1], b.where(a[0], gi, zero))
            acc(a[2], b.where(a[0], zero, gi))
        elif op == "clamp_min":
            acc(a[0], b.where(b.cmp("ge", a[0], a[1]), gi, zero))
            acc(a[1], b.where(b.cmp("lt", a[0], a[1]), gi, zero))
        elif op == "clamp_max":
            acc(a[0], b.where(b.cmp("le", a[0], a[1]), gi, zero))
            acc(a[1], b.where(b.cmp("gt", a[0], a[1]), gi, zero))
        elif op == "clamp":
            x, lo, hi = a
            acc(x, b.where(b.band(b.cmp("ge", x, lo), b.cmp("le", x, hi)), gi, zero))
            acc(lo, b.where(b.band(b.cmp("lt", x, lo), b.cmp("lt", lo, hi)), gi, zero))
            acc(hi, b.where(b.bor(b.cmp("gt", x, hi), b.cmp("gt", lo, hi)), gi, zero))
        elif op in ("maximum", "minimum"):
            win = "gt" if op == "maximum" else "lt"
            half = b.mul(gi, b.c(0.5))
            x0, x1 = a
            tie = b.cmp("eq", x0, x1)
            acc(x0, b.where(b.cmp(win, x0, x1), gi, b.where(tie, half, zero)))
            acc(x1, b.where(b.cmp(win, x1, x0), gi, b.where(tie, half, zero)))
        elif op == "cast":
            acc(a[0], gi)
        elif op in ("mod", "fmod"):
            acc(a[0], gi)
            if req[a[1]]:
                q = g.add("floordiv" if op == "mod" else "truncdiv", a, F)
                acc(a[1], b.mul(b.neg(gi), q))
    gscore = adj.get(0) if g[0].op == "score" else None
    loads = [
        (n.id, adj[n.id])
        for n in nodes
        if n.op == "load" and n.attr[0] in grad_slots and n.id in adj
    ]
    return gscore, loads


def _pow_rule(g, b, acc, req, n, gi, zero) -> None:
    x, e = n.args
    xn, en = g[x], g[e]
    if en.is_const:
        c = float(en.value)
        if c == 0.0:
            return
        if c == 1.0:
            acc(x, gi)
            return
        cm1 = g.const(c - 1.0, F)
        acc(x, b.mul(gi, b.mul(b.c(c), g.add("pow", (x, cm1), F))))
        return
    if xn.is_const:
        acc(e, b.mul(gi, b.mul(n.id, b.c(math.log(float(xn.value))))))
        return
    if req[x]:
        d = b.mul(gi, b.mul(e, g.add("pow", (x, b.sub(e, b.c(1.0))), F)))
        acc(x, b.where(b.cmp("eq", e, zero), zero, d))
    if req[e]:
        d = b.mul(gi, b.mul(n.id, b.op("log", x)))
        mask = b.band(b.cmp("eq", x, zero), b.cmp("ge", e, zero))
        acc(e, b.where(mask, zero, d))
