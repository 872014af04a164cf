"""Triton backend: ``torch.library`` custom ops with fake impls and autograd around the kernels.

``flex_attention_forward`` compiles ``score_mod`` and the BlockMask's ``mask_mod`` into
:class:`~hf_flexattn.compiler.ModCode` objects (cached on structure), picks block sizes,
registers the static part (mods' code, dtype, kernel_options) under an integer ``kernel_id``
and calls

* ``hf_flexattn::flex_fwd(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks?,
  full_kv_indices?, q_num_blocks?, q_indices?, full_q_num_blocks?, full_q_indices?,
  score_captures[], mask_captures[], kernel_id, scale, q_block, kv_block) -> (out, lse)``
* ``hf_flexattn::flex_bwd(...) -> [dq, dk, dv, *grads of score captures that need grad]``

Custom ops cannot take callables, hence the ``kernel_id`` registry; the captured tensors
travel as ``Tensor[]`` inputs so their gradients flow through autograd.

Shapes: q ``[B, Hq, L, E]``, k ``[B, Hkv, S, E]``, v ``[B, Hkv, S, Ev]`` ->
out ``[B, Hq, L, Ev]`` (q's dtype), lse ``[B, Hq, L]`` fp32 natural log.

Under ``torch.compile`` the preparation (tracing the mods, rendering kernels) runs in
``_static_prepare``, which dynamo evaluates as a constant at trace time; captured tensors are
then fetched by paths dynamo can trace (see the comment there). This needs the mods to be
created outside the compiled region (closures made inside it cannot be passed to a constant
function). Sizes and BlockMask block sizes may be symbolic (dynamic shapes): the ops read them
and pick launch configs at run time.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask as _TorchBlockMask
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._mod_eval import _FAMILY_ATTR, _FROZEN_ATTR
from ..block_mask import _transpose_ordered
from ..kernels import flex_decode as _flex_decode
from ..kernels._layout import empty_like_query
from ..kernels._render import env_reader
from ..kernels.flex_fwd import next_pow2

__all__ = ["flex_attention_forward", "prepare", "Prepared", "DECODE_MIN_S"]

_logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _logger.warning(msg)


# ------------------------------------------------------------------------------ registry
@dataclass
class _Entry:
    """Compiled mods plus what picks the launch configs. Configs depend on head dim and
    query length, which are read at launch time (so symbolic sizes under torch.compile
    never have to be constants)."""

    score_code: Any
    mask_code: Any
    capability: tuple[int, int] | None
    dtype: torch.dtype
    options: dict[str, Any]
    n_score: int
    n_mask: int
    grad_slots: list[int] = field(default_factory=list)  # score captures needing grad
    _cfgs: dict[tuple, Any] = field(default_factory=dict)
    _decode: dict[torch.dtype, Any] = field(default_factory=dict)

    def decode_kernel(self, dtype: torch.dtype) -> Any:
        """The split-KV decode kernel for ``dtype`` (cached on the entry)."""
        k = self._decode.get(dtype)
        if k is None:
            k = _flex_decode.get_decode_kernel(self.score_code, self.mask_code, dtype)
            self._decode[dtype] = k
        return k

    def config(self, kind: str, head_dim: int, q_len: int, q_block: int, kv_block: int) -> Any:
        """The fwd (``kind="fwd"``) or bwd config for these sizes (cached)."""
        key = (kind, head_dim, min(next_pow2(q_len), 256), q_block, kv_block)
        cfg = self._cfgs.get(key)
        if cfg is None:
            from ..kernels import flex_bwd, flex_fwd

            choose = flex_fwd.choose_config if kind == "fwd" else flex_bwd.choose_bwd_config
            cfg = choose(
                self.capability, self.dtype, head_dim, q_len, q_block, kv_block, self.options
            )
            self._cfgs[key] = cfg
        return cfg


def _options_key(options: dict[str, Any]) -> tuple:
    items = []
    for k, v in sorted(options.items()):
        try:
            hash(v)
        except TypeError:
            v = repr(v)
        items.append((k, v))
    return tuple(items)


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
    cur = code.captured
    if len(cur) == len(tensors) and all(a is b for a, b in zip(cur, tensors)):
        return code
    new = object.__new__(type(code))  # a shallow copy, without copy.copy's generic protocol
    new.__dict__.update(code.__dict__)
    new.captured = list(tensors)
    return new


# ------------------------------------------------------------------------------ helpers
def _capability(device: torch.device) -> tuple[int, int] | None:
    from ..kernels._render import interpreter_on

    if device.type != "cuda" or interpreter_on():
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPS.get(idx)
    if cap is None:
        cap = _CAPS[idx] = torch.cuda.get_device_capability(idx)
    return cap


_CAPS: dict[int, tuple[int, int]] = {}


_NOOPS: tuple = ()


def _is_noop_mask(fn: Any) -> bool:
    global _NOOPS
    if fn is None:
        return True
    if not _NOOPS:
        from torch.nn.attention.flex_attention import noop_mask as torch_noop

        try:
            from ..block_mask import noop_mask
        except ImportError:  # pragma: no cover - while modules are written
            return fn is torch_noop
        _NOOPS = (torch_noop, noop_mask)
    return fn is _NOOPS[0] or fn is _NOOPS[1]


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
    """Compile the mods (cached on structure), choose configs, register a kernel id.

    Repeated calls with mods of the same structure (same code, constants and captured
    tensors' dtype/rank/requires_grad; see ``hf_flexattn.compiler``) and the same shapes take
    a fast path: one structural walk per mod, then the captured tensors are looked up again
    in THIS call's mods (never reused from an earlier closure)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    fkey = famkey = None
    if _frozen(score_mod) and _frozen(mask_mod):
        opts = _options_key(kernel_options) if kernel_options else ()
        fam = getattr(mask_mod, _FAMILY_ATTR, None)
        if fam is not None:
            # a member of a declared family (see `freeze_family`): keyed on the family token
            # and the captures' specs, the captures are the member's own
            famkey = (id(score_mod), fam[0], _capture_specs(fam[1]), dtype, device, q_block,
                      kv_block, q_shape[-1], v_shape[-1], opts)
            hit = _FAMILY_CACHE.get(famkey)
            if (
                hit is not None
                and hit[1] is score_mod
                and all(t.requires_grad == g for t, g in zip(hit[0].score_captures, hit[2]))
            ):
                caps = list(fam[1])
                _check_devices(None, hit[0].score_captures, None, caps, device)
                return Prepared(hit[0].kernel_id, hit[0].score_captures, caps)
        else:
            # immutable closures (see `freeze`): no structural walk, keyed on identity
            fkey = (id(score_mod), id(mask_mod), dtype, device, q_block, kv_block,
                    q_shape[-1], v_shape[-1], opts)
            hit = _FROZEN_CACHE.get(fkey)
            if (
                hit is not None
                and hit[1] is score_mod
                and hit[2] is mask_mod
                and all(t.requires_grad == g for t, g in zip(hit[0].score_captures, hit[3]))
            ):
                return hit[0]
    ckey = _fast_key(
        q_shape, v_shape, dtype, device, score_mod, mask_mod, q_block, kv_block, kernel_options
    )
    prep = None
    if ckey is not None:
        hit = _PREP_CACHE.get(ckey[0])
        if hit is not None:
            caps = _recapture(hit[1], score_mod), _recapture(hit[2], mask_mod)
            if caps[0] is not None and caps[1] is not None:
                _check_devices(hit[1], caps[0], hit[2], caps[1], device)
                prep = Prepared(hit[0], caps[0], caps[1])
    if prep is None:
        prep, score_code, mask_code = _prepare_slow(
            q_shape, v_shape, dtype, device, score_mod, mask_mod, q_block, kv_block,
            kernel_options,
        )
        if ckey is not None:
            if len(_PREP_CACHE) >= _PREP_CACHE_MAX:
                _PREP_CACHE.pop(next(iter(_PREP_CACHE)))
            _PREP_CACHE[ckey[0]] = (prep.kernel_id, score_code, mask_code, ckey[1])
    flags = tuple(t.requires_grad for t in prep.score_captures)
    if fkey is not None:
        if len(_FROZEN_CACHE) >= _PREP_CACHE_MAX:
            _FROZEN_CACHE.pop(next(iter(_FROZEN_CACHE)))
        _FROZEN_CACHE[fkey] = (prep, score_mod, mask_mod, flags)
    if famkey is not None:
        declared = getattr(mask_mod, _FAMILY_ATTR)[1]
        if len(declared) == len(prep.mask_captures) and all(
            a is b for a, b in zip(declared, prep.mask_captures)
        ):
            if len(_FAMILY_CACHE) >= _PREP_CACHE_MAX:
                _FAMILY_CACHE.pop(next(iter(_FAMILY_CACHE)))
            _FAMILY_CACHE[famkey] = (prep, score_mod, flags)
        else:
            _warn_once(
                f"family:{famkey[1]!r}",
                f"hf_flexattn: mod family {famkey[1]!r} declares other captured tensors than "
                "the compiler found; its members are prepared the slow way.",
            )
    return prep


def _capture_specs(tensors: tuple) -> tuple:
    """What a compiled mod is specialised on for each captured tensor."""
    return tuple([(t.dtype, t.dim(), t.requires_grad, _is_large(t)) for t in tensors])


# family token + capture specs (+ score mod id, dtype, device, ...) -> (Prepared of the first
# member, score_mod, requires_grad flags of its captures); see `_mod_eval.freeze_family`
_FAMILY_CACHE: dict[tuple, tuple] = {}


# identity of frozen mods -> (Prepared, score_mod, mask_mod, requires_grad flags); holding the
# mods keeps their ids from being reused while cached
_FROZEN_CACHE: dict[tuple, tuple] = {}


def _frozen(fn: Any) -> bool:
    """Whether ``fn`` is ``None``, a no-op mask or a mod marked with ``_mod_eval.freeze``."""
    return getattr(fn, _FROZEN_ATTR, False) is True or _is_noop_mask(fn)



def _check_devices(score_code, score_caps, mask_code, mask_caps, device) -> None:
    for name, caps in (("score_mod", score_caps), ("block_mask.mask_mod", mask_caps)):
        for t in caps:
            if t.device != device:
                raise ValueError(
                    f"{name} captures a tensor on {t.device} but query is on {device}; "
                    f"move the captured tensor to {device}."
                )


# prepare's fast path: structural key of both mods + shapes -> (kernel id, ModCodes, refs)
_PREP_CACHE: dict[tuple, tuple] = {}
_PREP_CACHE_MAX = 256


def _default_compile_hook(fn: Callable, kind: str, prefix: str) -> Any:
    """Compile a mod to a ModCode (``hf_flexattn.compiler.compile_mod``); tests may replace."""
    from ..compiler import compile_mod

    return compile_mod(fn, kind, prefix=prefix)


compile_mod_hook = _default_compile_hook


def _mod_structure(fn: Any, noop: bool) -> tuple[Any, list] | None:
    if fn is None or noop:
        return ("none",), []
    from ..compiler import trace

    st = trace.structure(fn)
    if st is None:
        return None
    return st[0], st[2]


def _fast_key(q_shape, v_shape, dtype, device, score_mod, mask_mod, q_block, kv_block, opts):
    """(cache key, objects to keep alive) for prepare's fast path, or None (not cacheable)."""
    if compile_mod_hook is not _default_compile_hook:
        return None
    try:
        s = _mod_structure(score_mod, False)
        m = _mod_structure(mask_mod, _is_noop_mask(mask_mod))
        if s is None or m is None:
            return None
        key = (
            s[0],
            m[0],
            q_shape[-1],  # head dims only: configs for the other sizes are picked at launch
            v_shape[-1],
            dtype,
            device,
            q_block,
            kv_block,
            tuple(sorted(opts.items())) if opts else (),
        )
        hash(key)
    except (TypeError, ImportError):
        return None
    return key, s[1] + m[1]


def _is_large(t: Tensor) -> bool:
    """An element offset into ``t`` may pass 2**31 (as ``hf_flexattn.compiler`` decides)."""
    n = t.numel()
    if n == 0:
        return False
    if t.is_contiguous():  # the largest offset is numel - 1
        return n >= 2**31
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31 - 1


def _recapture(code: Any, fn: Any) -> list[Tensor] | None:
    """The captured tensors of ``fn`` for a cached ModCode of the same structure, or None."""
    c = getattr(code, "_c", None)
    if c is None:
        return [] if not code.captured else None
    tensors = c.resolve(fn)
    if tensors is None:
        return None
    for t, spec in zip(tensors, code.specs):
        if _is_large(t) != spec.large:
            return None
    return tensors


def _prepare_slow(
    q_shape, v_shape, dtype, device, score_mod, mask_mod, q_block, kv_block, kernel_options
) -> tuple[Prepared, Any, Any]:
    from ..kernels import flex_bwd, flex_fwd
    from ..kernels._render import NoMaskMod, NoScoreMod

    if score_mod is None:
        score_code = NoScoreMod()
    else:
        score_code = compile_mod_hook(score_mod, "score", "sm_")
    if _is_noop_mask(mask_mod):
        mask_code = NoMaskMod()
    else:
        mask_code = compile_mod_hook(mask_mod, "mask", "mm_")
    _check_devices(score_code, score_code.captured, mask_code, mask_code.captured, device)
    # sizes may be -1 (symbolic under torch.compile): configs are picked at launch; this
    # only validates kernel_options against the block sizes, before anything launches
    L, hd = q_shape[2], max(q_shape[3], v_shape[-1], 16)
    cap = _capability(device)
    if q_block > 0 and kv_block > 0:
        flex_fwd.choose_config(cap, dtype, hd, L, q_block, kv_block, kernel_options)
        flex_bwd.choose_bwd_config(cap, dtype, hd, L, q_block, kv_block, kernel_options)
    grad_slots = [i for i, s in enumerate(getattr(score_code, "specs", [])) if s.needs_grad]
    opts = dict(kernel_options or {})
    key = (score_code.key, mask_code.key, cap, dtype, _options_key(opts))
    kid = _register(
        key,
        lambda: _Entry(
            score_code,
            mask_code,
            cap,
            dtype,
            opts,
            len(score_code.captured),
            len(mask_code.captured),
            grad_slots,
        ),
    )
    prep = Prepared(kid, list(score_code.captured), list(mask_code.captured))
    return prep, score_code, mask_code


# --- torch.compile support -----------------------------------------------------------------
# Dynamo cannot trace the preparation (mod tracing under TorchFunctionModes, file rendering).
# Under torch.compile it runs in `_static_prepare`, which dynamo evaluates once at trace time
# as a constant (`assume_constant_result`); it returns the kernel id and *paths* from each mod
# object (closure cells, globals, defaults, items, attributes) to
# * each captured tensor: the compiled code fetches them with plain attribute/item access,
#   which dynamo traces, so they become graph inputs and receive gradients;
# * each Python constant the kernel was specialised on: the compiled code compares it with
#   the value the kernel baked in, which makes dynamo guard on it, so a mod with another
#   constant (a different window, say) recompiles instead of reusing a stale kernel.
def _mod_paths(fn: Any, captured: list[Tensor], name: str) -> tuple[tuple, tuple]:
    if fn is None or not captured and _is_noop_mask(fn):
        return (), ()
    from ..compiler import trace

    st = trace.structure(fn)
    consts = trace.constants(fn)
    if st is None or consts is None:
        raise TypeError(
            f"{name} refers to too many objects to be guarded under torch.compile; "
            "keep its closure small (tensors and numbers)."
        )
    paths = []
    for t in captured:
        p = st[1].get(id(t))
        if p is None:
            raise TypeError(
                f"{name} reads a tensor that cannot be reached from the mod object "
                "(closure cells, globals, attributes), so torch.compile cannot pass it "
                "to the kernel; capture it in the mod's closure."
            )
        paths.append(p)
    return tuple(paths), tuple(consts)


@torch._dynamo.assume_constant_result
def _static_prepare(
    dtype: torch.dtype,
    device: str,
    score_mod: Any,
    mask_mod: Any,
    options: tuple,
) -> tuple[int, tuple, tuple, tuple, tuple]:
    # sizes and block sizes (which dynamo may make symbolic) are read by the ops at launch
    shape = (-1, -1, -1, -1)
    prep = prepare(
        shape, shape, dtype, torch.device(device), score_mod, mask_mod, -1, -1, dict(options)
    )
    s_paths, s_consts = _mod_paths(score_mod, prep.score_captures, "score_mod")
    m_paths, m_consts = _mod_paths(mask_mod, prep.mask_captures, "block_mask.mask_mod")
    return prep.kernel_id, s_paths, m_paths, s_consts, m_consts


def _guard_constants(fn: Any, consts: tuple, name: str) -> None:
    """Traced by dynamo: compares each baked-in constant, so that dynamo guards on it."""
    from ..compiler.trace import resolve_path

    for path, value in consts:
        now = resolve_path(fn, path)
        if now != value and not (now != now and value != value):  # NaN equals NaN here
            raise RuntimeError(f"{name} changed while being compiled (at {path}).")


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
    q_block: int,
    kv_block: int,
) -> tuple[Tensor, Tensor]:
    """Forward kernel: (out ``[B,Hq,L,Ev]`` in q's dtype, lse ``[B,Hq,L]`` fp32)."""
    return _fwd_impl(
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
        q_block,
        kv_block,
    )


def _fwd_launch_rest(
    q, v, kvn, kvi, fkvn, fkvi, score_caps, mask_caps, kernel_id, scale, q_block, kv_block,
) -> tuple:
    """The arguments of ``flex_fwd.launch`` after q, k and v: the BlockMask's kv-side
    tensors, the mods bound to their captures, scale, block sizes and the config."""
    e = _ENTRIES[kernel_id]
    return (
        kvn,
        kvi,
        fkvn,
        fkvi,
        _with_captured(e.score_code, score_caps),
        _with_captured(e.mask_code, mask_caps),
        scale,
        q_block,
        kv_block,
        e.config("fwd", max(q.shape[-1], v.shape[-1]), q.shape[2], q_block, kv_block),
    )


def _fwd_impl(
    q, k, v, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, score_caps, mask_caps, kernel_id, scale,
    q_block, kv_block,
) -> tuple[Tensor, Tensor]:
    from ..kernels import flex_fwd

    rest = _fwd_launch_rest(q, v, kvn, kvi, fkvn, fkvi, score_caps, mask_caps, kernel_id,
                            scale, q_block, kv_block)
    return flex_fwd.launch(q, k, v, *rest)


#: Store forward plans (:class:`_FwdPlan`); benchmarks switch it off to compare.
_FWD_PLANS = True


class _FwdPlan:
    """A forward launch of the regular kernel with everything but q, k and v fixed
    (:func:`_fwd_launch_rest`). Stored on the BlockMask like a decode plan (see
    :func:`run_plan`), so the later layers of a prompt, which share one mask and one set of
    shapes, skip validation, preparation and the config choice. ``plan(q, k, v, need_lse,
    blhd)`` as for :class:`~hf_flexattn.kernels.flex_decode.DecodePlan`."""

    __slots__ = ("rest",)

    def __init__(self, rest: tuple) -> None:
        self.rest = rest

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, need_lse: bool = True,
                 blhd: bool = False) -> tuple[Tensor, Tensor | None]:
        from ..kernels import flex_fwd

        out, lse = flex_fwd.launch(q, k, v, *self.rest)
        return (out.transpose(1, 2) if blhd else out), (lse if need_lse else None)


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
    q_block,
    kv_block,
):
    B, H, L, _ = q.shape
    out = empty_like_query(q, v.shape[-1])  # the strides the kernel's launcher gives it
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
    q_block: int,
    kv_block: int,
) -> list[Tensor]:
    """Backward kernels: ``[dq, dk, dv, *grads of the score captures that need grad]``."""
    from ..kernels import flex_bwd

    e = _ENTRIES[kernel_id]
    if q_num_blocks is None or q_indices is None:
        q_num_blocks, q_indices = _transpose_ordered(kv_num_blocks, kv_indices)
    if full_kv_num_blocks is not None and (full_q_num_blocks is None or full_q_indices is None):
        full_q_num_blocks, full_q_indices = _transpose_ordered(full_kv_num_blocks, full_kv_indices)
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
        q_block,
        kv_block,
        e.config("bwd", max(q.shape[-1], v.shape[-1]), q.shape[2], q_block, kv_block),
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
    q_block,
    kv_block,
):
    e = _ENTRIES[kernel_id]
    grads = [torch.empty_like(score_captures[i]) for i in e.grad_slots]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *grads]


def _setup_context(ctx, inputs, output):
    (q, k, v, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, score_caps, mask_caps, kid, scale) = inputs[
        :15
    ]
    out, lse = output
    ctx.save_for_backward(
        q, k, v, out, lse, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, *score_caps, *mask_caps
    )
    ctx.n_score = len(score_caps)
    ctx.kernel_id = kid
    ctx.scale = scale
    ctx.blocks = inputs[15:17]


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
        *ctx.blocks,
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
        None,
        None,
    )


flex_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ decode
# The decode kernel from this many keys on (``kernel_options["decode"]`` unset or "auto").
# It was 256 (below that, splitting the kv work saves no GPU time), but short caches are
# where generation is bound by host time, and only the decode path has stored plans: on the
# H200, batch 1 after a 128-token prompt, a step took 10.4 ms with 256 and 7.1 ms with 1
# (sdpa 7.0), batch 32 13.0 against 15.3 ms (BENCHMARKS.md, session 12).
DECODE_MIN_S = 1


_DECODE_CFGS: dict[tuple, Any] = {}


def _decode_config(
    device: torch.device,
    dtype: torch.dtype,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    Ev: int,
    kv_block: int,
    num_splits: int | None,
) -> Any:
    """The split-KV kernel's DecodeConfig for these shapes (cached; the key length enters
    only as its number of kv-blocks, so consecutive decoding steps share an entry)."""
    key = (device, dtype, q_shape, k_shape[0], k_shape[1], k_shape[3],
           -(-k_shape[2] // kv_block), Ev, kv_block, num_splits)
    cfg = _DECODE_CFGS.get(key)
    if cfg is None:
        B, Hq, L, E = q_shape
        cfg = _flex_decode.choose_decode_config(
            _capability(device),
            device,
            dtype,
            B,
            Hq,
            k_shape[1],
            L,
            k_shape[2],
            max(E, Ev),
            kv_block,
            num_splits,
        )
        if len(_DECODE_CFGS) > 1024:
            _DECODE_CFGS.clear()
        _DECODE_CFGS[key] = cfg
    return cfg


def _decode_options(kernel_options: dict[str, Any]) -> tuple[Any, int | None]:
    mode = kernel_options.get("decode")
    if mode not in (None, "auto", True, False):
        raise ValueError(
            f'kernel_options["decode"] must be True, False, "auto" or None, got {mode!r}.'
        )
    splits = kernel_options.get("split_kv")
    if splits is not None and (
        isinstance(splits, bool) or not isinstance(splits, int) or splits < 1
    ):
        raise ValueError(f'kernel_options["split_kv"] must be a positive int, got {splits!r}.')
    return mode, splits


def _use_decode(
    query: Tensor,
    key: Tensor,
    block_mask: Any,
    q_block: int,
    need_grad: bool,
    mode: Any,
) -> bool:
    """True if the split-KV decode kernel should run this call (see ``kernels.flex_decode``):
    no gradient needed, ``L * GROUP`` small, one q-block row, a head-broadcast mask unless
    GROUP == 1, and (unless ``kernel_options["decode"]`` is True) ``S >= DECODE_MIN_S``."""
    if mode is False or need_grad:
        return False
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    if not _flex_decode.decode_supported(
        L, Hq, key.shape[1], block_mask.kv_num_blocks.shape[1], q_block
    ):
        return False
    return mode is True or S >= DECODE_MIN_S


@torch.library.custom_op("hf_flexattn::flex_decode", mutates_args=())
def flex_decode_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    score_captures: list[Tensor],
    mask_captures: list[Tensor],
    kernel_id: int,
    scale: float,
    kv_block: int,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """Split-KV forward for short queries (no autograd): (out ``[B,Hq,L,Ev]``, lse
    ``[B,Hq,L]`` fp32)."""
    return _decode_impl(
        q,
        k,
        v,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        score_captures,
        mask_captures,
        kernel_id,
        scale,
        kv_block,
        num_splits,
        fresh=True,  # the op runs inside compiled graphs: no cached workspace
    )


def _decode_impl(
    q, k, v, kvn, kvi, fkvn, fkvi, score_caps, mask_caps, kernel_id, scale, kv_block, num_splits,
    plan_out: list | None = None,
    fresh: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run the decode kernel; with ``plan_out`` (a list) also build and append the
    :class:`~hf_flexattn.kernels.flex_decode.DecodePlan` for later calls of these shapes and
    its :class:`~hf_flexattn.kernels.flex_decode.DecodeTemplate`.
    ``fresh``: allocate the workspace instead of reusing the cached one (the custom op, which
    may run in a CUDA-graph warm-up whose allocations come from the graph's pool)."""
    e = _ENTRIES[kernel_id]
    cfg = _decode_config(
        q.device,
        q.dtype,
        tuple(q.shape),
        tuple(k.shape),
        v.shape[-1],
        kv_block,
        num_splits if num_splits > 0 else None,
    )
    args = (
        q,
        k,
        v,
        kvn,
        kvi,
        fkvn,
        fkvi,
        _with_captured(e.score_code, score_caps),
        _with_captured(e.mask_code, mask_caps),
        scale,
        kv_block,
        cfg,
        e.decode_kernel(q.dtype),
    )
    if plan_out is not None and q.shape[0] * q.shape[1] * q.shape[2] > 0:
        templates: list = []
        plan = _flex_decode.plan_decode(*args, template_out=templates)
        plan_out.extend((plan, templates[0]))
        return _flex_decode.launch_decode(*args, plan=plan)
    return _flex_decode.launch_decode(*args, fresh=fresh)


@flex_decode_op.register_fake
def _flex_decode_fake(
    q,
    k,
    v,
    kv_num_blocks,
    kv_indices,
    full_kv_num_blocks,
    full_kv_indices,
    score_captures,
    mask_captures,
    kernel_id,
    scale,
    kv_block,
    num_splits,
):
    B, H, L, _ = q.shape
    return empty_like_query(q, v.shape[-1]), q.new_empty((B, H, L), dtype=torch.float32)


def _direct_call_ok(tensors: tuple[Tensor, ...]) -> bool:
    """True when an op's implementation may be called without the dispatcher (eager, plain
    tensors, no modes or functorch transforms active): saves the custom-op overhead."""
    if torch._C._is_torch_function_mode_enabled():
        return False
    if _dispatch_stack_len() > 0:  # a TorchDispatchMode is active
        return False
    if _peek_interpreter_stack is None or _peek_interpreter_stack() is not None:
        return False
    for t in tensors:
        if type(t) is not Tensor:
            return False
    return True


_peek_interpreter_stack = getattr(torch._C._functorch, "peek_interpreter_stack", None)
_dispatch_stack_len = getattr(
    torch._C, "_len_torch_dispatch_stack", lambda: 0 if _get_current_dispatch_mode() is None else 1
)


# ------------------------------------------------------------------------------ decode plans
# Token-by-token decoding calls attention once per layer with the same BlockMask, mods and
# shapes, only new q/k/v tensors. The first such call stores a DecodePlan on the BlockMask;
# `run_plan` (called by `hf_flexattn.flex_attention` before anything else) then skips
# validation, preparation and config choice, which it may: the key covers every input
# `flex_attention` validates except the tensors' values, and the mods are frozen.
_PLANS_ATTR = "_hf_flexattn_plans"
_ENV_BACKEND = env_reader("HF_FLEXATTN_BACKEND")
_MAX_PLANS = 8


def _plan_options(kernel_options: Any) -> Any:
    """The backend choice of ``kernel_options`` if it holds nothing else (plans are made
    only for calls without tuning options), else a marker that matches no plan."""
    if not kernel_options:
        return None
    if type(kernel_options) is dict and kernel_options.keys() == {"backend"}:
        return kernel_options["backend"]
    return _NO_PLAN


_NO_PLAN = object()


def _plan_key(
    query: Tensor, key: Tensor, value: Tensor, score_mod: Any, scale: float, opts: Any
) -> tuple:
    return (
        opts,
        id(score_mod),
        query.shape,
        query.stride(),
        key.shape,
        key.stride(),
        value.shape,
        value.stride(),
        query.dtype,
        key.dtype,
        value.dtype,
        query.device,
        key.device,
        value.device,
        scale,
        _ENV_BACKEND(),
    )


def _remember_plan(block_mask, query, key, value, score_mod, scale, opts, plan,
                   score_caps: list, pkey: tuple | None = None) -> None:
    plans = getattr(block_mask, _PLANS_ATTR, None)
    if plans is None:
        plans = {}
        try:
            setattr(block_mask, _PLANS_ATTR, plans)
        except AttributeError:  # pragma: no cover - a BlockMask class with __slots__
            return
    if len(plans) >= _MAX_PLANS:
        plans.clear()
    grad_caps = tuple(t for t in score_caps if t.requires_grad) if score_caps else ()
    if pkey is None:
        pkey = _plan_key(query, key, value, score_mod, float(scale), opts)
    parts = (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
             block_mask.full_kv_indices, block_mask.mask_mod)
    plans[pkey] = (plan, score_mod, grad_caps, parts)


def _same_mask_parts(block_mask: Any, parts: tuple) -> bool:
    """Whether ``block_mask`` still holds the kv-side tensors and mask_mod a plan was stored
    with (see :func:`_remember_plan`); a plan binds those objects."""
    return (
        block_mask.kv_num_blocks is parts[0]
        and block_mask.kv_indices is parts[1]
        and block_mask.full_kv_num_blocks is parts[2]
        and block_mask.full_kv_indices is parts[3]
        and block_mask.mask_mod is parts[4]
    )


# Decode templates. Each decoding step brings a new BlockMask (one key more), so the first
# layer of a step finds no plan on it. When the mask_mod belongs to a declared family
# (`_mod_eval.freeze_family`: the Transformers integration's masks), the call that stores a
# plan also stores a template keyed on everything about the call that stays the same from
# step to step; the next step's first call builds its plan from the template, checking what
# may change (the lengths, the mask's tensors and captures) instead of validating and
# preparing everything again.
_TEMPLATES: dict[tuple, tuple] = {}
_MAX_TEMPLATES = 64


def _kv_sig(pkey: tuple) -> tuple:
    """What stays the same of k and v from one decoding step to the next, from a plan key
    (see :func:`_plan_key`): all but the key length and the strides that follow from it."""
    ks, kst, vs, vst = pkey[4], pkey[5], pkey[6], pkey[7]
    return (ks[0], ks[1], ks[3], kst[3], vs[0], vs[1], vs[3], vst[3])


def _template_key_of(pkey: tuple, block_mask: Any, fam: Any = None) -> tuple | None:
    """The template key of a call from its plan key (see :func:`_plan_key`: the tensors'
    shapes, strides, dtypes and devices are read once) and its BlockMask: everything but the
    key length and the strides that follow from it. ``fam``: the mask_mod's family
    declaration if the caller has read it."""
    if fam is None:
        fam = getattr(block_mask.mask_mod, _FAMILY_ATTR, None)
        if fam is None:
            return None
    kvn = block_mask.kv_num_blocks
    return (
        pkey[0],  # opts
        pkey[15],  # backend switch
        pkey[1],  # id(score_mod)
        fam[0],
        _capture_specs(fam[1]),
        pkey[2],  # query shape, strides, dtype, device
        pkey[3],
        pkey[8],
        pkey[11],
        _kv_sig(pkey),
        pkey[9],  # k and v dtypes and devices
        pkey[12],
        pkey[10],
        pkey[13],
        pkey[14],  # scale
        block_mask.BLOCK_SIZE,
        kvn.shape,  # [B, H, 1]: one q-block row
        kvn.device,
        block_mask.full_kv_num_blocks is None,
    )


def _remember_template(pkey: tuple, block_mask, kid, score_mod, score_caps: list,
                       mask_caps: list, template: Any) -> None:
    """Store ``template`` for the call whose plan key is ``pkey`` (see :func:`_plan_key`)."""
    tkey = _template_key_of(pkey, block_mask)
    if tkey is None:
        return
    declared = getattr(block_mask.mask_mod, _FAMILY_ATTR)[1]
    if len(declared) != len(mask_caps) or not all(a is b for a, b in zip(declared, mask_caps)):
        return
    if len(_TEMPLATES) >= _MAX_TEMPLATES:
        _TEMPLATES.pop(next(iter(_TEMPLATES)))
    _TEMPLATES[tkey] = (kid, score_mod, list(score_caps), template)


def _plan_from_template(query, key, value, score_mod, block_mask, scale, opts, pkey) -> Any:
    """A DecodePlan for this call from a stored template, or None (then the normal path,
    which validates everything, runs)."""
    if not isinstance(block_mask, _TorchBlockMask):
        return None
    fam = getattr(block_mask.mask_mod, _FAMILY_ATTR, None)
    if fam is None:
        return None
    succ = _SUCCESSORS.get(fam[0])
    if succ is not None:
        plan = succ.next_plan(query, key, value, score_mod, block_mask, fam[1], scale, opts,
                              pkey)
        if plan is not None:
            return plan
    hit = _TEMPLATES.get(_template_key_of(pkey, block_mask, fam))
    if hit is None or hit[1] is not score_mod:
        return None
    kid, _, score_caps, template = hit
    if torch.is_grad_enabled() and any(t.requires_grad for t in score_caps):
        return None  # a learnable score_mod under autograd: the differentiable kernels
    qs, ks, vs = pkey[2], pkey[4], pkey[6]
    L, S = qs[2], ks[2]
    kvn, kvi = block_mask.kv_num_blocks, block_mask.kv_indices
    fkvn, fkvi = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    if (
        vs[2] != S
        or S < DECODE_MIN_S
        or tuple(block_mask.seq_lengths) != (L, S)
        or kvi.device != kvn.device
        or (fkvi is None) != (fkvn is None)
        or (fkvi is not None and (fkvi.device != kvn.device or fkvn.device != kvn.device))
    ):
        return None
    caps = fam[1]
    device = pkey[11]
    for t in caps:
        if t.device != device:
            return None
    e = _ENTRIES[kid]
    kv_block = _block_size(block_mask)[1]
    cfg = _decode_config(device, pkey[8], qs, ks, vs[3], kv_block, None)
    plan = template.plan(
        key, value, kvn, kvi, fkvn, fkvi, _with_captured(e.mask_code, caps), cfg,
        (pkey[5], pkey[7]), raw=True,  # a family mask: the integration's own tensors
    )
    _remember_plan(block_mask, query, key, value, score_mod, scale, opts, plan, score_caps, pkey)
    _Successor.record(fam[0], pkey, hit, e.mask_code, block_mask, caps, kv_block, cfg)
    return plan


# The successor of a step. Inside one decoding loop the next step's first call differs from
# the last step's in the key length (and the k/v strides and kv-block count that follow from
# it) and in the mask's captured tensors (new offsets, a longer padding mask), while its
# BlockMask usually holds the very same (cached) index views. The template path records the
# step it planned, per mask family; the next step checks only what may have changed against
# that record, skipping the template key and the checks the last step already passed.
_SUCCESSORS: dict[Any, _Successor] = {}
_MAX_SUCCESSORS = 16


def clear_templates() -> None:
    """Forget the decode templates and the steps recorded from them."""
    _TEMPLATES.clear()
    _SUCCESSORS.clear()


class _Successor:
    __slots__ = ("pkey", "kid", "score_mod", "score_caps", "template", "args_of", "kvn", "kvi",
                 "fkvn", "fkvi", "block_size", "kv_sig", "caps_sig", "kv_block", "nkv", "cfg")

    @staticmethod
    def record(token: Any, pkey: tuple, hit: tuple, mask_code: Any, block_mask: Any,
               caps: tuple, kv_block: int, cfg: Any) -> None:
        if getattr(mask_code, "params", None):
            args_of = getattr(mask_code, "capture_args", None)
            if args_of is None:
                return
        elif caps:
            return
        else:
            args_of = None
        sig = []
        for t in caps:
            if _is_large(t):
                return
            sig.append((t.dtype, t.dim(), t.requires_grad))
        r = _Successor()
        r.pkey, (r.kid, r.score_mod, r.score_caps, r.template) = pkey, hit
        r.args_of = args_of
        r.kvn, r.kvi = block_mask.kv_num_blocks, block_mask.kv_indices
        r.fkvn, r.fkvi = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
        r.block_size = tuple(block_mask.BLOCK_SIZE)
        r.kv_sig = _kv_sig(pkey)
        r.caps_sig = tuple(sig)
        r.kv_block, r.nkv, r.cfg = kv_block, -(-pkey[4][2] // kv_block), cfg
        if token not in _SUCCESSORS and len(_SUCCESSORS) >= _MAX_SUCCESSORS:
            _SUCCESSORS.pop(next(iter(_SUCCESSORS)))
        _SUCCESSORS[token] = r

    def next_plan(self, query, key, value, score_mod, block_mask, caps, scale, opts,
                  pkey) -> Any:
        """This step's DecodePlan, or None where anything but the key length, the strides
        that follow from it and the captures' values differs from the recorded step."""
        p = self.pkey
        # opts, score_mod, q's shape and strides; the dtypes, devices, scale, backend switch
        if pkey[:4] != p[:4] or pkey[8:] != p[8:] or self.score_mod is not score_mod:
            return None
        S = pkey[4][2]
        if (
            pkey[6][2] != S
            or S < DECODE_MIN_S
            or _kv_sig(pkey) != self.kv_sig
            or block_mask.kv_num_blocks is not self.kvn
            or block_mask.kv_indices is not self.kvi
            or block_mask.full_kv_num_blocks is not self.fkvn
            or block_mask.full_kv_indices is not self.fkvi
            or tuple(block_mask.BLOCK_SIZE) != self.block_size
            or tuple(block_mask.seq_lengths) != (pkey[2][2], S)
            or len(caps) != len(self.caps_sig)
        ):
            return None
        device = pkey[11]
        for t, sig in zip(caps, self.caps_sig):
            d = t.dim()
            if t.device != device or (t.dtype, d, t.requires_grad) != sig or (
                d and _is_large(t)
            ):
                return None
        if self.score_caps and torch.is_grad_enabled() and any(
            t.requires_grad for t in self.score_caps
        ):
            return None  # a learnable score_mod under autograd: the differentiable kernels
        nkv = -(-S // self.kv_block)
        if nkv != self.nkv:
            self.cfg = _decode_config(device, pkey[8], pkey[2], pkey[4], pkey[6][3],
                                      self.kv_block, None)
            self.nkv = nkv
        margs = ((), ()) if self.args_of is None else self.args_of(caps)
        plan = self.template.plan(
            key, value, self.kvn, self.kvi, self.fkvn, self.fkvi, None, self.cfg,
            (pkey[5], pkey[7]), raw=True, mask_args=margs,
        )
        _remember_plan(block_mask, query, key, value, score_mod, scale, opts, plan,
                       self.score_caps, pkey)
        return plan


def may_have_plan(block_mask: Any) -> bool:
    """Whether :func:`run_plan` may find or make a plan for ``block_mask`` (cheap). Never
    under torch.compile, which then traces none of the caches (no guards on them)."""
    if torch.compiler.is_compiling():
        return False
    return bool(getattr(block_mask, _PLANS_ATTR, None)) or (
        bool(_TEMPLATES)
        and getattr(getattr(block_mask, "mask_mod", None), _FAMILY_ATTR, None) is not None
    )


def run_plan(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    score_mod: Any,
    block_mask: Any,
    scale: Any,
    enable_gqa: bool,
    kernel_options: Any = None,
    return_lse: bool = True,
    blhd: bool = False,
) -> tuple[Tensor, Tensor | None] | None:
    """``(out, lse)`` from a stored decode plan for exactly these inputs (or one made from a
    template: see ``_TEMPLATES``), or ``None`` (then the caller takes the normal path);
    ``lse`` is None unless ``return_lse``. ``out`` is ``[B, Hq, L, Ev]``, or with ``blhd``
    ``[B, L, Hq, Ev]`` (contiguous where q's memory order allows: Transformers' layout)."""
    if torch.compiler.is_compiling():
        return None
    plans = getattr(block_mask, _PLANS_ATTR, None)
    if not plans and not _TEMPLATES:
        return None
    opts = _plan_options(kernel_options) if kernel_options else None
    if opts is _NO_PLAN:
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif type(scale) is not float:
        return None
    if torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    ):
        return None
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return None
    if not _direct_call_ok((query, key, value)):
        return None
    pkey = _plan_key(query, key, value, score_mod, scale, opts)
    hit = plans.get(pkey) if plans else None
    if hit is None:
        plan = _plan_from_template(query, key, value, score_mod, block_mask, scale, opts, pkey)
        return None if plan is None else plan(query, key, value, return_lse, blhd)
    if hit[1] is not score_mod:
        return None
    if hit[2] and torch.is_grad_enabled() and any(t.requires_grad for t in hit[2]):
        return None  # a learnable score_mod under autograd: the differentiable kernels
    if not _same_mask_parts(block_mask, hit[3]):
        return None  # tensors or mask_mod reassigned since the plan was stored
    return hit[0](query, key, value, return_lse, blhd)


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
    mode, splits = _decode_options(kernel_options)
    compiling = torch.compiler.is_compiling()
    if compiling:
        from ..compiler.trace import resolve_path

        opts = tuple(sorted((k, v) for k, v in kernel_options.items() if k != "backend"))
        kid, s_paths, m_paths, s_consts, m_consts = _static_prepare(
            query.dtype, str(query.device), score_mod, mask_mod, opts
        )
        _guard_constants(score_mod, s_consts, "score_mod")
        _guard_constants(mask_mod, m_consts, "block_mask.mask_mod")
        score_caps = [resolve_path(score_mod, p) for p in s_paths]
        mask_caps = [resolve_path(mask_mod, p) for p in m_paths]
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
    q_in, k_in, v_in = _prep_input(query), _prep_input(key), _prep_input(value)
    if _use_decode(query, key, block_mask, q_block, need_grad, mode):
        # the op picks the number of splits from the real shapes (0: automatic)
        n_splits = 0 if splits is None else int(splits)
        args = (
            q_in,
            k_in,
            v_in,
            block_mask.kv_num_blocks,
            block_mask.kv_indices,
            block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices,
            score_caps,
            mask_caps,
            kid,
            float(scale),
            kv_block,
            n_splits,
        )
        if not compiling and _direct_call_ok((q_in, k_in, v_in)):
            opts = _plan_options(kernel_options)
            if (
                opts is not _NO_PLAN
                and q_in is query
                and k_in is key
                and v_in is value
                and _frozen(score_mod)
                and _frozen(mask_mod)
            ):
                plans: list = []
                res = _decode_impl(*args, plan_out=plans)
                if plans:
                    pkey = _plan_key(query, key, value, score_mod, float(scale), opts)
                    _remember_plan(
                        block_mask, query, key, value, score_mod, scale, opts, plans[0],
                        score_caps, pkey,
                    )
                    _remember_template(
                        pkey, block_mask, kid, score_mod, score_caps, mask_caps, plans[1]
                    )
                return res
            return _decode_impl(*args)
        return flex_decode_op(*args)
    if compiling:
        qn, qi = block_mask.q_num_blocks, block_mask.q_indices
        fqn, fqi = block_mask.full_q_num_blocks, block_mask.full_q_indices
    else:
        qn, qi, fqn, fqi = _q_side(block_mask, need_grad)
    args = (
        q_in,
        k_in,
        v_in,
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
        q_block,
        kv_block,
    )
    if not compiling and not need_grad and _direct_call_ok((q_in, k_in, v_in)):
        opts = _plan_options(kernel_options)
        if (
            _FWD_PLANS
            and opts is not _NO_PLAN
            and q_in is query
            and k_in is key
            and v_in is value
            and _frozen(score_mod)
            and _frozen(mask_mod)
        ):
            # the next calls with this mask and these shapes (a prompt's later layers) run
            # the plan from run_plan
            plan = _FwdPlan(_fwd_launch_rest(
                query, value, *args[3:7], score_caps, mask_caps, kid, float(scale), q_block,
                kv_block,
            ))
            _remember_plan(block_mask, query, key, value, score_mod, scale, opts, plan,
                           score_caps)
            return plan(query, key, value)
        return _fwd_impl(*args)
    out, lse = flex_fwd_op(*args)
    return out, lse
