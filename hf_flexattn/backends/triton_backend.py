"""Triton backend: ``torch.library`` custom ops with fake impls and autograd around the kernels.

``flex_attention_forward`` compiles ``score_mod`` and the BlockMask's ``mask_mod`` into
:class:`~hf_flexattn.compiler.ModCode` objects (cached on structure), picks block sizes,
registers the static part (mods' code, configs) under an integer ``kernel_id`` and calls

* ``hf_flexattn::flex_fwd(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks?,
  full_kv_indices?, q_num_blocks?, q_indices?, full_q_num_blocks?, full_q_indices?,
  score_captures[], mask_captures[], kernel_id, scale) -> (out, lse)``
* ``hf_flexattn::flex_bwd(...) -> [dq, dk, dv, *grads of score captures that need grad]``

Custom ops cannot take callables, hence the ``kernel_id`` registry; the captured tensors
travel as ``Tensor[]`` inputs so their gradients flow through autograd.

Shapes: q ``[B, Hq, L, E]``, k ``[B, Hkv, S, E]``, v ``[B, Hkv, S, Ev]`` ->
out ``[B, Hq, L, Ev]`` (q's dtype), lse ``[B, Hq, L]`` fp32 natural log.

Under ``torch.compile`` the preparation (tracing the mods, rendering kernels) runs in
``_static_prepare``, which dynamo evaluates as a constant at trace time; captured tensors are
then fetched by paths dynamo can trace (see the comment there). This needs the mods to be
created outside the compiled region (closures made inside it cannot be passed to a constant
function) and static shapes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["flex_attention_forward", "prepare", "Prepared"]

_logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _logger.warning(msg)


def compile_mod_hook(fn: Callable, kind: str, prefix: str) -> Any:
    """Compile a mod to a ModCode (``hf_flexattn.compiler.compile_mod``); tests may replace."""
    from ..compiler import compile_mod

    return compile_mod(fn, kind, prefix=prefix)


# ------------------------------------------------------------------------------ registry
@dataclass
class _Entry:
    score_code: Any
    mask_code: Any
    fwd_cfg: Any
    bwd_cfg: Any
    q_block: int
    kv_block: int
    n_score: int
    n_mask: int
    grad_slots: list[int] = field(default_factory=list)  # score captures needing grad


_ENTRIES: list[_Entry] = []
_ENTRY_IDS: dict[Any, int] = {}
_REG_LOCK = threading.Lock()


def _register(key: Any, make: Callable[[], _Entry]) -> int:
    kid = _ENTRY_IDS.get(key)
    if kid is not None:
        return kid
    with _REG_LOCK:
        kid = _ENTRY_IDS.get(key)
        if kid is None:
            _ENTRIES.append(make())
            kid = len(_ENTRIES) - 1
            _ENTRY_IDS[key] = kid
    return kid


def _with_captured(code: Any, tensors: list[Tensor]) -> Any:
    """``code`` (structure of a first call) bound to this call's captured tensors."""
    if not getattr(code, "params", None):
        return code
    import copy

    new = copy.copy(code)
    new.captured = list(tensors)
    return new


# ------------------------------------------------------------------------------ helpers
def _capability(device: torch.device) -> tuple[int, int] | None:
    from ..kernels._render import interpreter_on

    if device.type != "cuda" or interpreter_on():
        return None
    return torch.cuda.get_device_capability(device)


def _is_noop_mask(fn: Any) -> bool:
    if fn is None:
        return True
    from torch.nn.attention.flex_attention import noop_mask as torch_noop

    if fn is torch_noop:
        return True
    try:
        from ..block_mask import noop_mask
    except ImportError:  # pragma: no cover - while modules are written
        return False
    return fn is noop_mask


def _block_size(block_mask: Any) -> tuple[int, int]:
    bs = block_mask.BLOCK_SIZE
    if isinstance(bs, int):
        return int(bs), int(bs)
    return int(bs[0]), int(bs[1])


def _q_side(block_mask: Any, need: bool) -> tuple[Tensor | None, ...]:
    qn, qi = block_mask.q_num_blocks, block_mask.q_indices
    fqn, fqi = block_mask.full_q_num_blocks, block_mask.full_q_indices
    complete = (
        qn is not None
        and qi is not None
        and (block_mask.full_kv_num_blocks is None or (fqn is not None and fqi is not None))
    )
    if complete or not need:
        return qn, qi, fqn, fqi
    from ..block_mask import ensure_q_indices

    bm = ensure_q_indices(block_mask)
    return bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices


def _transpose_indices(num: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """kv-side (per q-block) lists -> q-side (per kv-block) lists; ordering as the builders."""
    *batch, rows, k = idx.shape
    dense = torch.zeros(*batch, rows, k + 1, dtype=torch.int32, device=idx.device)
    keep = torch.arange(k, device=idx.device) < num.unsqueeze(-1).to(torch.int64)
    cols = torch.where(keep, idx.to(torch.int64), k)
    dense.scatter_(-1, cols, 1)
    dense = dense[..., :k].transpose(-2, -1)
    counts = dense.sum(-1).to(torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), order.contiguous()


def _prep_input(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------ prepare
@dataclass
class Prepared:
    """Everything static about one call: the kernel id and the captured tensors."""

    kernel_id: int
    score_captures: list[Tensor]
    mask_captures: list[Tensor]


def prepare(
    q_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    score_mod: Callable | None,
    mask_mod: Callable | None,
    q_block: int,
    kv_block: int,
    kernel_options: dict[str, Any],
) -> Prepared:
    """Compile the mods (cached on structure), choose configs, register a kernel id."""
    from ..kernels import flex_bwd, flex_fwd
    from ..kernels._render import NoMaskMod, NoScoreMod

    device = torch.device(device)
    if score_mod is None:
        score_code = NoScoreMod()
    else:
        score_code = compile_mod_hook(score_mod, "score", "sm_")
    if _is_noop_mask(mask_mod):
        mask_code = NoMaskMod()
    else:
        mask_code = compile_mod_hook(mask_mod, "mask", "mm_")
    for name, code in (("score_mod", score_code), ("block_mask.mask_mod", mask_code)):
        for t in code.captured:
            if t.device != device:
                raise ValueError(
                    f"{name} captures a tensor on {t.device} but query is on {device}; "
                    f"move the captured tensor to {device}."
                )
    L, E = q_shape[2], q_shape[3]
    Ev = v_shape[-1]
    cap = _capability(device)
    fwd_cfg = flex_fwd.choose_config(cap, dtype, max(E, Ev), L, q_block, kv_block, kernel_options)
    bwd_cfg = flex_bwd.choose_bwd_config(
        cap, dtype, max(E, Ev), L, q_block, kv_block, kernel_options
    )
    grad_slots = [i for i, s in enumerate(getattr(score_code, "specs", [])) if s.needs_grad]
    key = (score_code.key, mask_code.key, fwd_cfg, bwd_cfg, q_block, kv_block)
    kid = _register(
        key,
        lambda: _Entry(
            score_code,
            mask_code,
            fwd_cfg,
            bwd_cfg,
            q_block,
            kv_block,
            len(score_code.captured),
            len(mask_code.captured),
            grad_slots,
        ),
    )
    return Prepared(kid, list(score_code.captured), list(mask_code.captured))


# --- torch.compile support -----------------------------------------------------------------
# Dynamo cannot trace the preparation (mod tracing under TorchFunctionModes, file rendering).
# Under torch.compile it runs in `_static_prepare`, which dynamo evaluates once at trace time
# as a constant (`assume_constant_result`); it returns the kernel id and, for each captured
# tensor, a *path* from the mod object to it (closure cells, globals, items, attributes).
# The compiled code then walks those paths with plain attribute/item access, which dynamo
# traces, so captured tensors become graph inputs and receive gradients.
_MAX_DEPTH = 6


def _children(obj: Any) -> list[tuple[tuple, Any]]:
    out: list[tuple[tuple, Any]] = []
    if isinstance(obj, (tuple, list)):
        out += [(("item", i), x) for i, x in enumerate(obj)]
    elif isinstance(obj, dict):
        out += [(("item", k), x) for k, x in obj.items() if isinstance(k, (str, int))]
    elif callable(obj):
        import functools

        if isinstance(obj, functools.partial):
            out += [
                (("attr", "args"), obj.args),
                (("attr", "keywords"), obj.keywords),
                (("attr", "func"), obj.func),
            ]
        code = getattr(obj, "__code__", None)
        cells = getattr(obj, "__closure__", None) or ()
        for i, c in enumerate(cells):
            try:
                out.append((("cell", i), c.cell_contents))
            except ValueError:
                pass
        glb = getattr(obj, "__globals__", None)
        if code is not None and glb is not None:
            out += [(("global", n), glb[n]) for n in code.co_names if n in glb]
        if hasattr(obj, "__self__"):
            out.append((("attr", "__self__"), obj.__self__))
    if (
        not isinstance(obj, (tuple, list, dict, type))
        and hasattr(obj, "__dict__")
        and not callable(obj)
        and not isinstance(obj, (torch.Tensor, torch.nn.Module))
    ):
        out += [(("attr", k), x) for k, x in vars(obj).items()]
    if isinstance(obj, torch.nn.Module):
        out += [(("attr", k), x) for k, x in obj.named_parameters(recurse=False)]
        out += [(("attr", k), x) for k, x in obj.named_buffers(recurse=False)]
        out += [(("attr", k), x) for k, x in obj._modules.items()]
    return out


def _find_path(root: Any, target: Tensor) -> tuple | None:
    seen: set[int] = set()
    frontier: list[tuple[tuple, Any]] = [((), root)]
    for _ in range(_MAX_DEPTH):
        nxt = []
        for path, obj in frontier:
            for step, child in _children(obj):
                if child is target:
                    return path + (step,)
                if id(child) in seen or isinstance(child, (torch.Tensor, str, int, float)):
                    continue
                seen.add(id(child))
                nxt.append((path + (step,), child))
        frontier = nxt
    return None


def _walk(obj: Any, path: tuple) -> Any:
    for kind, key in path:
        if kind == "cell":
            obj = obj.__closure__[key].cell_contents
        elif kind == "global":
            obj = obj.__globals__[key]
        elif kind == "item":
            obj = obj[key]
        else:
            obj = getattr(obj, key)
    return obj


@torch._dynamo.assume_constant_result
def _static_prepare(
    q_shape: tuple,
    v_shape: tuple,
    dtype: torch.dtype,
    device: str,
    score_mod: Any,
    mask_mod: Any,
    q_block: int,
    kv_block: int,
    options: tuple,
) -> tuple[int, tuple, tuple]:
    prep = prepare(
        q_shape,
        v_shape,
        dtype,
        torch.device(device),
        score_mod,
        mask_mod,
        q_block,
        kv_block,
        dict(options),
    )
    paths = []
    for root, caps, name in (
        (score_mod, prep.score_captures, "score_mod"),
        (mask_mod, prep.mask_captures, "block_mask.mask_mod"),
    ):
        ps = []
        for t in caps:
            p = _find_path(root, t)
            if p is None:
                raise TypeError(
                    f"{name} reads a tensor that cannot be reached from the mod object "
                    "(closure cells, globals, attributes), so torch.compile cannot pass it "
                    "to the kernel; capture it in the mod's closure."
                )
            ps.append(p)
        paths.append(tuple(ps))
    return prep.kernel_id, paths[0], paths[1]


# ------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("hf_flexattn::flex_fwd", mutates_args=())
def flex_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    q_num_blocks: Tensor | None,
    q_indices: Tensor | None,
    full_q_num_blocks: Tensor | None,
    full_q_indices: Tensor | None,
    score_captures: list[Tensor],
    mask_captures: list[Tensor],
    kernel_id: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Forward kernel: (out ``[B,Hq,L,Ev]`` in q's dtype, lse ``[B,Hq,L]`` fp32)."""
    from ..kernels import flex_fwd

    e = _ENTRIES[kernel_id]
    return flex_fwd.launch(
        q,
        k,
        v,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        _with_captured(e.score_code, score_captures),
        _with_captured(e.mask_code, mask_captures),
        scale,
        e.q_block,
        e.kv_block,
        e.fwd_cfg,
    )


@flex_fwd_op.register_fake
def _flex_fwd_fake(
    q,
    k,
    v,
    kv_num_blocks,
    kv_indices,
    full_kv_num_blocks,
    full_kv_indices,
    q_num_blocks,
    q_indices,
    full_q_num_blocks,
    full_q_indices,
    score_captures,
    mask_captures,
    kernel_id,
    scale,
):
    B, H, L, _ = q.shape
    out = q.new_empty((B, H, L, v.shape[-1]))
    lse = q.new_empty((B, H, L), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("hf_flexattn::flex_bwd", mutates_args=())
def flex_bwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    q_num_blocks: Tensor | None,
    q_indices: Tensor | None,
    full_q_num_blocks: Tensor | None,
    full_q_indices: Tensor | None,
    score_captures: list[Tensor],
    mask_captures: list[Tensor],
    kernel_id: int,
    scale: float,
) -> list[Tensor]:
    """Backward kernels: ``[dq, dk, dv, *grads of the score captures that need grad]``."""
    from ..kernels import flex_bwd

    e = _ENTRIES[kernel_id]
    if q_num_blocks is None or q_indices is None:
        q_num_blocks, q_indices = _transpose_indices(kv_num_blocks, kv_indices)
    if full_kv_num_blocks is not None and (full_q_num_blocks is None or full_q_indices is None):
        full_q_num_blocks, full_q_indices = _transpose_indices(full_kv_num_blocks, full_kv_indices)
    bufs = [
        torch.zeros(score_captures[i].shape, dtype=torch.float32, device=q.device)
        for i in e.grad_slots
    ]
    dq, dk, dv = flex_bwd.launch_bwd(
        q,
        k,
        v,
        out,
        lse,
        dout,
        dlse,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        q_num_blocks,
        q_indices,
        full_q_num_blocks,
        full_q_indices,
        _with_captured(e.score_code, score_captures),
        _with_captured(e.mask_code, mask_captures),
        scale,
        e.q_block,
        e.kv_block,
        e.bwd_cfg,
        bufs,
    )
    grads = [g.to(score_captures[i].dtype) for g, i in zip(bufs, e.grad_slots)]
    return [dq, dk, dv, *grads]


@flex_bwd_op.register_fake
def _flex_bwd_fake(
    q,
    k,
    v,
    out,
    lse,
    dout,
    dlse,
    kv_num_blocks,
    kv_indices,
    full_kv_num_blocks,
    full_kv_indices,
    q_num_blocks,
    q_indices,
    full_q_num_blocks,
    full_q_indices,
    score_captures,
    mask_captures,
    kernel_id,
    scale,
):
    e = _ENTRIES[kernel_id]
    grads = [torch.empty_like(score_captures[i]) for i in e.grad_slots]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *grads]


def _setup_context(ctx, inputs, output):
    (q, k, v, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, score_caps, mask_caps, kid, scale) = inputs
    out, lse = output
    ctx.save_for_backward(
        q, k, v, out, lse, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, *score_caps, *mask_caps
    )
    ctx.n_score = len(score_caps)
    ctx.kernel_id = kid
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    q, k, v, out, lse, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi = saved[:13]
    score_caps = list(saved[13 : 13 + ctx.n_score])
    mask_caps = list(saved[13 + ctx.n_score :])
    if dout is None:
        dout = torch.zeros_like(out)
    res = flex_bwd_op(
        q,
        k,
        v,
        out,
        lse,
        dout,
        dlse,
        kvn,
        kvi,
        fkvn,
        fkvi,
        qn,
        qi,
        fqn,
        fqi,
        score_caps,
        mask_caps,
        ctx.kernel_id,
        ctx.scale,
    )
    dq, dk, dv = res[:3]
    e = _ENTRIES[ctx.kernel_id]
    cap_grads: list[Tensor | None] = [None] * ctx.n_score
    for g, i in zip(res[3:], e.grad_slots):
        cap_grads[i] = g
    mask_grads: list[Tensor | None] = [None] * (len(saved) - 13 - ctx.n_score)
    return (
        dq,
        dk,
        dv,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        cap_grads,
        mask_grads,
        None,
        None,
    )


flex_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ entry point
def flex_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    score_mod: Callable | None,
    block_mask: Any,
    scale: float,
    kernel_options: dict[str, Any],
) -> tuple[Tensor, Tensor]:
    """Validated inputs (see ``hf_flexattn.api``): q ``[B,Hq,L,E]``, k ``[B,Hkv,S,E]``,
    v ``[B,Hkv,S,Ev]``; ``block_mask`` is never None. Returns out ``[B,Hq,L,Ev]`` in
    query's dtype and lse ``[B,Hq,L]`` fp32 (natural log, ``-inf`` for empty rows).
    Differentiable w.r.t. q, k, v and the tensors score_mod captures that require grad."""
    if query.dtype == torch.float64:
        _warn_once(
            "fp64",
            "hf_flexattn: the Triton kernels do not run float64; using the "
            "torch backend for float64 inputs.",
        )
        from .torch_backend import flex_attention_forward as torch_forward

        return torch_forward(query, key, value, score_mod, block_mask, scale, kernel_options)
    q_block, kv_block = _block_size(block_mask)
    mask_mod = block_mask.mask_mod
    if torch.compiler.is_compiling():
        opts = tuple(sorted((k, v) for k, v in kernel_options.items() if k != "backend"))
        kid, s_paths, m_paths = _static_prepare(
            tuple(query.shape),
            tuple(value.shape),
            query.dtype,
            str(query.device),
            score_mod,
            mask_mod,
            q_block,
            kv_block,
            opts,
        )
        score_caps = [_walk(score_mod, p) for p in s_paths]
        mask_caps = [_walk(mask_mod, p) for p in m_paths]
        qn, qi = block_mask.q_num_blocks, block_mask.q_indices
        fqn, fqi = block_mask.full_q_num_blocks, block_mask.full_q_indices
    else:
        prep = prepare(
            tuple(query.shape),
            tuple(value.shape),
            query.dtype,
            query.device,
            score_mod,
            mask_mod,
            q_block,
            kv_block,
            kernel_options,
        )
        kid, score_caps, mask_caps = prep.kernel_id, prep.score_captures, prep.mask_captures
        need_grad = torch.is_grad_enabled() and (
            query.requires_grad
            or key.requires_grad
            or value.requires_grad
            or any(t.requires_grad for t in score_caps)
        )
        qn, qi, fqn, fqi = _q_side(block_mask, need_grad)
    out, lse = flex_fwd_op(
        _prep_input(query),
        _prep_input(key),
        _prep_input(value),
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        qn,
        qi,
        fqn,
        fqi,
        score_caps,
        mask_caps,
        kid,
        float(scale),
    )
    return out, lse
