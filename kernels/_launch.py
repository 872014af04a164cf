"""A cheaper launch path for ``@triton.jit`` kernels that are called again and again.

``kernel[grid](*args, **constexprs)`` binds and specialises every argument in Python on
each call (tens of microseconds for our ~40-argument kernels). During token-by-token
decoding that overhead, paid per layer, is larger than the kernel itself. A
:class:`Launcher` keys the compiled kernel on what Triton specialises on (each tensor's
dtype and 16-byte alignment, each int's value being 1, divisibility by 16 and 32-bit range,
the constexpr values, warps and stages), compiles and launches through Triton on a miss, and
on a hit calls the compiled kernel's launcher directly.

The direct path is used only on CUDA, with no launch hooks installed (profilers such as
proton add them; an empty hook chain counts as none), and only for plain tensors, ints,
floats, bools, None and Triton's host ``TensorDescriptor`` over a CUDA tensor (the compiled
launcher encodes those itself); everything else takes Triton's own path. Under
``TRITON_INTERPRET=1`` it always takes Triton's path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ._render import interpreter_on

__all__ = ["Launcher", "check_grid"]

_logger = logging.getLogger(__name__)
_MAX_KEYS = 256
_I32 = (-(2**31), 2**31 - 1)
_disabled = False
#: launches so far through Triton's own path and directly (for tests and benchmarks)
stats = {"triton": 0, "direct": 0}


_KNOBS: list = []


MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z dimensions


def check_grid(B: int, H: int) -> None:
    """ValueError unless batch ``B`` and heads ``H`` fit the kernels' grids (y = heads,
    z = batch)."""
    if B > MAX_GRID_YZ or H > MAX_GRID_YZ:
        raise ValueError(
            f"the Triton kernels take at most {MAX_GRID_YZ} batch entries and {MAX_GRID_YZ} "
            f"heads per call (CUDA grid limits), got batch {B} and {H} heads; split the batch "
            "into chunks, or use kernel_options={'backend': 'torch'}."
        )


def _knobs() -> Any:
    """``triton.knobs`` (imported once), or None before Triton 3.4: no direct path."""
    if not _KNOBS:
        try:
            from triton import knobs
        except ImportError:  # pragma: no cover
            knobs = None
        _KNOBS.append(knobs)
    return _KNOBS[0]


_GET_DEVICE = getattr(torch._C, "_cuda_getDevice", None)


def _current_device() -> int:
    """The current CUDA device (callers hold CUDA tensors, so CUDA is initialised)."""
    return _GET_DEVICE()


def _raw_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _empty(hook: Any) -> bool:
    """No launch hook: None, or an empty ``triton.knobs.HookChain`` (Triton >= 3.6)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def _no_hooks() -> bool:
    knobs = _KNOBS[0] if _KNOBS else _knobs()
    return knobs is not None and (
        _empty(knobs.runtime.launch_enter_hook) and _empty(knobs.runtime.launch_exit_hook)
    )


#: Triton's host-side ``TensorDescriptor`` class once a Launcher exists (None before, or on a
#: Triton without it); False once a compiled launcher has refused one
_DESC: list = [None]


_TD: list = []


def descriptor_type() -> Any:
    """Triton's host-side ``TensorDescriptor`` class (Triton >= 3.4), or None."""
    if not _TD:
        try:
            from triton.tools.tensor_descriptor import TensorDescriptor
        except ImportError:  # pragma: no cover - older Triton
            TensorDescriptor = None
        _TD.append(TensorDescriptor)
    return _TD[0]


def _desc_spec(d: Any) -> tuple | None:
    """A superset of what Triton specialises a host tensor descriptor on: its base's dtype
    and alignment, the block shape, the padding and TF32 flags (the IR type), and the
    int specialisation of shape and strides (which Triton passes as plain ints today)."""
    base = d.base
    if not isinstance(base, torch.Tensor):
        return None
    ints = (*d.shape, *d.strides)
    if not all(type(x) is int for x in ints):
        return None
    int_spec = _spec(ints)
    if int_spec is None:  # outside int32
        return None
    return ("desc", base.dtype, base.data_ptr() & 15 == 0, tuple(d.block_shape),
            getattr(d, "padding", None), getattr(d, "round_f32_to_tf32", None), int_spec)


def _spec(args: tuple) -> tuple | None:
    """What Triton specialises ``args`` on (a superset of it), or None if not plain."""
    out = []
    add = out.append
    lo, hi = _I32
    Tensor = torch.Tensor
    desc = _DESC[0]
    for a in args:
        t = type(a)
        if t is int:  # the common case first: strides and sizes
            if not lo <= a <= hi:
                return None
            add(1 if a == 1 else (0 if a & 15 else 16))
        elif t is Tensor or isinstance(a, Tensor):
            add((a.dtype, a.data_ptr() & 15 == 0))
        elif a is None:
            add(None)
        elif t is bool:
            add("T" if a else "F")  # not 1/0: True == 1 in a dict key
        elif t is float:
            add(0.5)
        elif t is desc and desc:
            d = _desc_spec(a)
            if d is None:
                return None
            add(d)
        else:
            return None
    return tuple(out)


class Launcher:
    """``Launcher(jit_fn)(grid, args, constexprs)`` launches like
    ``jit_fn[grid](*args, **constexprs)``; ``constexprs`` (which includes ``num_warps`` and
    ``num_stages``) must name every parameter after the positional ``args``."""

    def __init__(self, fn: Any) -> None:
        if _DESC[0] is None:
            _DESC[0] = descriptor_type()
        self.fn = fn
        self.names = list(fn.arg_names)
        self.kernels: dict[tuple, tuple] = {}

    def _triton(self, grid: tuple, args: tuple, constexprs: dict) -> Any:
        stats["triton"] += 1
        return self.fn[grid](*args, **constexprs)

    def __call__(self, grid: tuple, args: tuple, constexprs: dict) -> None:
        if _disabled or interpreter_on():
            self._triton(grid, args, constexprs)
            return
        spec = _spec(args)
        if spec is None:
            self._triton(grid, args, constexprs)
            return
        self._launch(spec, tuple(constexprs.items()), grid, args, constexprs)

    def bind(self, grid: tuple, tail: tuple, constexprs: dict,
             tail_spec: tuple | None = None, shared: tuple | None = None,
             checked: int | None = None, direct_tail: tuple | None = None) -> Bound:
        """A launch whose arguments after the first few are fixed: see :class:`Bound`.
        ``tail_spec``: ``_spec(tail)`` if the caller has it already (None: computed);
        ``shared``, ``checked``, ``direct_tail``: see :meth:`shared_entry` and
        :class:`Bound`."""
        return Bound(self, grid, tail, constexprs, tail_spec, shared, checked, direct_tail)

    @staticmethod
    def shared_entry(constexprs: dict) -> tuple:
        """What Bounds of one tail specialisation and one set of constexprs may share:
        ``(constexpr key, {(device, head alignment): compiled kernel})``. A caller that makes
        many such Bounds (one per decoding step) passes it to :meth:`bind`, so a new Bound's
        first launch goes directly to the kernel an earlier one found."""
        return tuple(constexprs.items()), {}

    def _launch(self, spec: tuple, cx_key: tuple, grid: tuple, args: tuple, cx: dict) -> Any:
        """Launch directly if ``spec`` was compiled before, else through Triton (recording
        the compiled kernel). Returns the cache entry used, or None."""
        if not _no_hooks():
            self._triton(grid, args, cx)
            return None
        dev = _current_device()
        key = (dev, spec, cx_key)
        hit = self.kernels.get(key)
        if hit is None:
            kernel = self._triton(grid, args, cx)
            names = self.names
            n = len(args)
            ok = (
                kernel is not None
                and all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata"))
                and len(names) == n + sum(1 for k in cx if k in names)
                and all(k in cx for k in names[n:])
            )
            if ok:
                if len(self.kernels) >= _MAX_KEYS:
                    self.kernels.clear()
                tail = tuple(cx[k] for k in names[n:])
                self.kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata, tail)
            return None
        g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        return hit if self._direct(hit, dev, g, grid, args, cx) else None

    def _direct(self, hit: tuple, dev: int, g: tuple, grid: tuple, args: tuple, cx: dict) -> bool:
        """Call the compiled kernel's launcher; False (after launching through Triton) if
        this Triton's launcher takes other arguments."""
        run, function, metadata, tail = hit
        try:
            run(g[0], g[1], g[2], _raw_stream(dev), function, metadata, None, None, None,
                *args, *tail)
        except TypeError as e:  # raised while parsing arguments: nothing was launched
            self._direct_failed(e, grid, args, cx)
            return False
        stats["direct"] += 1
        return True

    def _direct_failed(self, e: Exception, grid: tuple, args: tuple, cx: dict) -> None:
        """This Triton's launcher takes other arguments: launch through Triton, now and from
        now on (only for launches with tensor descriptors, if the failed one had some)."""
        global _disabled
        desc = _DESC[0]
        if desc and any(type(a) is desc for a in args):
            _logger.warning("hf_flexattn: direct Triton launch with tensor descriptors "
                            "unavailable (%s); using Triton's for those", e)
            _DESC[0] = False
        else:
            _logger.warning(
                "hf_flexattn: direct Triton launch unavailable (%s); using Triton's", e
            )
            _disabled = True
        self._triton(grid, args, cx)


class Bound:
    """``bound(*head)`` launches ``fn[grid](*head, *tail, **constexprs)``; the tail's
    specialisation is computed once, so a call only inspects the head: tensors whose dtypes
    must not change from call to call, CUDA tensors on the current device (their pointers
    go to the launch as ints, unchecked). Only the alignment of the first ``checked`` head
    tensors (all if None) is looked at on each call; the caller guarantees that the others
    are always 16-byte aligned (fresh allocations of the caching allocator are).

    ``direct_tail``: what direct launches pass instead of ``tail``: the same values with
    some tensors replaced by their ``data_ptr()``, for tensors the owner keeps alive and
    whose storage is never swapped (``set_``, ``.data =``) while the Bound is in use (Triton
    then neither calls ``data_ptr()`` nor queries the driver on each launch)."""

    def __init__(self, launcher: Launcher, grid: tuple, tail: tuple, constexprs: dict,
                 tail_spec: tuple | None = None, shared: tuple | None = None,
                 checked: int | None = None, direct_tail: tuple | None = None) -> None:
        self.launcher = launcher
        self.grid = grid
        self.g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.tail = tuple(tail)
        # what direct launches pass after the head (Triton's own path gets the tensors)
        self.direct_tail = self.tail if direct_tail is None else tuple(direct_tail)
        if len(self.direct_tail) != len(self.tail):
            raise ValueError("direct_tail must have one value per tail argument")
        self.constexprs = constexprs
        self.tail_spec = _spec(self.tail) if tail_spec is None else tail_spec
        if shared is None:
            shared = Launcher.shared_entry(constexprs)
        self.cx_key = shared[0]
        self.checked = checked
        self.slow = self.tail_spec is None or interpreter_on()
        # (device, head alignment) -> launcher entry; shared by Bounds of one tail spec
        self.hits: dict[tuple, tuple] = shared[1]

    def __call__(self, *head: torch.Tensor) -> None:
        if self.slow or _disabled:
            self.launcher._triton(self.grid, head + self.tail, self.constexprs)
            return
        # the head is tensors whose dtypes the owner keeps fixed: their alignment is all that
        # can change Triton's specialisation from call to call
        dev = _current_device()
        ptrs = [t.data_ptr() for t in head]
        n = self.checked
        key = (dev, *[p & 15 == 0 for p in (ptrs if n is None else ptrs[:n])])
        hit = self.hits.get(key)
        if hit is not None and _no_hooks():
            run, function, metadata, cx_tail = hit
            g = self.g
            try:
                # the head as raw pointers: Triton's launcher takes an int as it is, where for
                # a tensor it calls data_ptr() and asks the driver whether the pointer is a
                # device one (the owner guarantees CUDA tensors of this launch's device)
                run(g[0], g[1], g[2], _raw_stream(dev), function, metadata, None, None, None,
                    *ptrs, *self.direct_tail, *cx_tail)
            except TypeError as e:  # raised while parsing arguments: nothing was launched
                self.launcher._direct_failed(e, self.grid, head + self.tail, self.constexprs)
                return
            stats["direct"] += 1
            return
        args = head + self.tail
        spec = _spec(head)
        if spec is None:
            self.launcher._triton(self.grid, args, self.constexprs)
            return
        hit = self.launcher._launch(
            spec + self.tail_spec, self.cx_key, self.grid, args, self.constexprs
        )
        if hit is not None:
            self.hits[key] = (hit[0], hit[1], hit[2], hit[3])


def launcher_for(fn: Any) -> Launcher:
    """The :class:`Launcher` of a jitted kernel (one per kernel object)."""
    lau = getattr(fn, "_hf_flexattn_launcher", None)
    if lau is None:
        lau = Launcher(fn)
        try:
            fn._hf_flexattn_launcher = lau
        except AttributeError:  # pragma: no cover - a kernel object with __slots__
            pass
    return lau
