"""``hf-flexattn bench``: our kernels next to torch's FlexAttention and SDPA, in one run.

For every variant (mask / score mod) and head configuration ``Hq/Hkv/D`` it times

* ``ours``: :func:`hf_flexattn.flex_attention` (``backend="triton"`` on CUDA, ``"torch"``
  on the CPU), with our block mask (analytic builder where one exists);
* ``torch_flex``: ``torch.compile(torch.nn.attention.flex_attention, dynamic=False)`` with
  torch's ``create_block_mask`` on the same ``mask_mod`` (eager on the CPU / with
  ``--no-compile``);
* ``sdpa_flash`` / ``sdpa_cudnn``: ``F.scaled_dot_product_attention`` restricted to one
  SDPA backend, only for the variants SDPA can express (full, causal);

in the directions ``fwd`` (training forward: inputs require grad) and ``fwdbwd`` (forward and
backward); ``bwd`` is reported as ``fwdbwd - fwd``.  ``--decode`` times one query row
against an ``S``-token cache instead (forward only, mods shifted to the last position).

TFLOPs count only the ``(q, kv)`` pairs the mask allows (counted exactly by evaluating the
mask in chunks): ``fwd = 4 * pairs * D`` summed over batch and heads (two matmuls),
``bwd = 2.5 * fwd``, ``fwdbwd = 3.5 * fwd``.  Per variant it also times block-mask building
(ours analytic, ours generic, torch's ``create_block_mask``) and per row the first call
(which includes tracing / code generation / compilation) of ours and of torch's compiled
FlexAttention.

Outputs, in ``--out`` (default ``./bench_out``): ``results.json`` (header with date, device,
versions and command, per-row facts and every cell), ``results.csv`` (one line per cell),
``results.png`` (grouped bars of TFLOPs, one subplot per direction) and a printed table.
``results.json``/``.csv`` are rewritten after every row, so an interrupted run keeps what it
measured.  ``--quick`` is a tiny CPU smoke run (seconds).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._mod_eval import eval_mask_mod

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_IMPLS",
    "ALL_VARIANTS",
    "attention_flops",
    "count_allowed_pairs",
    "main",
    "parse_heads",
]

ALL_VARIANTS = ("full", "causal", "sliding_window", "documents", "alibi", "softcap", "prefix_lm")
ALL_IMPLS = ("ours", "torch_flex", "sdpa_flash", "sdpa_cudnn")
ALL_DIRECTIONS = ("fwd", "fwdbwd")
DEFAULT_HEADS = "32/32/128,64/8/128,128/8/128"
HEAD_NAMES = {(32, 32, 128): "llama2-7b", (64, 8, 128): "qwen2.5-72b", (128, 8, 128): "llama3-405b"}
BWD_FACTOR = 2.5  # backward FLOPs per forward FLOP (5 matmuls vs 2)

# variant parameters (the defaults; --quick shrinks them with the sequence)
WINDOW = 1024
NUM_DOCS = 12
DOC_SEED = 0
SOFTCAP = 50.0


# --------------------------------------------------------------------------------------------
# FLOP accounting
# --------------------------------------------------------------------------------------------
def count_allowed_pairs(
    mask_mod: Callable | None,
    B: int,
    H: int,
    L: int,
    S: int,
    device: torch.device | str = "cpu",
    chunk_elems: int = 1 << 24,
) -> int:
    """Exact number of ``(b, h, q_idx, kv_idx)`` positions that ``mask_mod`` allows.

    Summed over ``b < B``, ``h < H``, ``q_idx < L``, ``kv_idx < S``; ``None`` allows all
    ``B * H * L * S``.  The mask is evaluated on ``device`` in chunks of query rows of at
    most ``chunk_elems`` positions; a mask that does not depend on ``b`` (or ``h``) is
    evaluated for one batch row (head) and multiplied.
    """
    for name, val in (("B", B), ("H", H), ("L", L), ("S", S), ("chunk_elems", chunk_elems)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}.")
    if mask_mod is None:
        return B * H * L * S
    dev = torch.device(device)
    b_all = torch.arange(B, device=dev)
    h_all = torch.arange(H, device=dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    probe = eval_mask_mod(mask_mod, b_all, h_all, zero, zero)
    b_dep = B > 1 and probe.stride(0) != 0
    h_dep = H > 1 and probe.stride(1) != 0
    bs = b_all if b_dep else b_all[:1]
    hs = h_all if h_dep else h_all[:1]
    rows = max(1, chunk_elems // (S * bs.numel() * hs.numel()))
    kv = torch.arange(S, device=dev)
    total = torch.zeros((), dtype=torch.int64, device=dev)
    for q0 in range(0, L, rows):
        q = torch.arange(q0, min(q0 + rows, L), device=dev)
        x = eval_mask_mod(mask_mod, bs, hs, q, kv)
        scale = 1
        if x.shape[0] > 1 and x.stride(0) == 0:  # came back broadcast over b after all
            x, scale = x[:1], scale * x.shape[0]
        if x.shape[1] > 1 and x.stride(1) == 0:
            x, scale = x[:, :1], scale * x.shape[1]
        total += x.sum(dtype=torch.int64) * scale
    mult = (1 if b_dep else B) * (1 if h_dep else H)
    return int(total.item()) * mult


def attention_flops(
    pairs: int, head_dim: int, direction: str, head_dim_v: int | None = None
) -> float:
    """FLOPs of attention over ``pairs`` allowed positions (already summed over B and H).

    ``fwd``: ``2 * pairs * D`` (``q @ k^T``) ``+ 2 * pairs * Dv`` (``p @ v``); ``bwd``:
    ``2.5 * fwd``; ``fwdbwd``: ``3.5 * fwd``; ``decode`` counts like ``fwd``.
    """
    dv = head_dim if head_dim_v is None else head_dim_v
    fwd = 2.0 * pairs * head_dim + 2.0 * pairs * dv
    factors = {"fwd": 1.0, "decode": 1.0, "bwd": BWD_FACTOR, "fwdbwd": 1.0 + BWD_FACTOR}
    if direction not in factors:
        raise ValueError(f"direction must be one of {sorted(factors)}, got {direction!r}.")
    return fwd * factors[direction]


def parse_heads(spec: str) -> list[tuple[int, int, int]]:
    """``"32/32/128,64/8/128"`` -> ``[(Hq, Hkv, D), ...]`` (``Hq`` a multiple of ``Hkv``)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split("/")
        try:
            hq, hkv, d = (int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"--heads entries must look like Hq/Hkv/D (e.g. 32/8/128), got {item!r}."
            ) from None
        if min(hq, hkv, d) < 1 or hq % hkv:
            raise ValueError(f"--heads {item!r}: need positive sizes and Hq a multiple of Hkv.")
        out.append((hq, hkv, d))
    if not out:
        raise ValueError(f"--heads must name at least one Hq/Hkv/D, got {spec!r}.")
    return out


# --------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------
def _bloom_slopes(n: int, device: torch.device) -> torch.Tensor:
    """Bloom's ALiBi slopes (closest power of two, then interleaved extra slopes)."""
    p2 = 2 ** math.floor(math.log2(n))
    base = 2.0 ** (-(2.0 ** -(math.log2(p2) - 3)))
    slopes = [base**i for i in range(1, p2 + 1)]
    if p2 < n:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * p2) - 3)))
        slopes += [extra**i for i in range(1, 2 * (n - p2), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


class _Fallback:
    """Stand-ins used only where ``hf_flexattn.mods`` lacks a mod (or its signature differs)."""

    @staticmethod
    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    @staticmethod
    def sliding_window(window: int) -> Callable:
        def sliding_window_mask(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        return sliding_window_mask

    @staticmethod
    def document_mask(ids: torch.Tensor) -> Callable:
        def document_causal_mask(b, h, q_idx, kv_idx):
            return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

        return document_causal_mask

    @staticmethod
    def prefix_lm(prefix: int) -> Callable:
        def prefix_lm_mask(b, h, q_idx, kv_idx):
            return (kv_idx < prefix) | (q_idx >= kv_idx)

        return prefix_lm_mask

    @staticmethod
    def alibi(slopes: torch.Tensor) -> Callable:
        def alibi_bias(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        return alibi_bias

    @staticmethod
    def softcap(cap: float) -> Callable:
        def softcap_score(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        return softcap_score


def _lib() -> Any:
    try:
        from . import mods

        return mods
    except ImportError:
        return None


def _mod(name: str, *args: Any, **kwargs: Any) -> tuple[Callable, str]:
    """``hf_flexattn.mods.<name>(*args, **kwargs)`` if it works, else the local stand-in
    (whose defaults match the keyword arguments the bench passes)."""
    lib = _lib()
    fn = getattr(lib, name, None) if lib is not None else None
    if fn is not None:
        try:
            return (fn(*args, **kwargs) if args or kwargs else fn), "hf_flexattn.mods"
        except (TypeError, ValueError) as err:
            logger.warning("hf_flexattn.mods.%s failed (%s); using the bench stand-in.", name, err)
    fb = getattr(_Fallback, name)
    return (fb(*args) if args else fb), "bench stand-in"


def _shift_q(mod: Callable | None, off: int, score: bool) -> Callable | None:
    """Place the queries at absolute position ``q_idx + off`` (decode: ``off = S - 1``)."""
    if mod is None or off == 0:
        return mod
    if score:

        def shifted_score(score_, b, h, q_idx, kv_idx):
            return mod(score_, b, h, q_idx + off, kv_idx)

        return shifted_score

    def shifted_mask(b, h, q_idx, kv_idx):
        return mod(b, h, q_idx + off, kv_idx)

    return shifted_mask


@dataclass
class Variant:
    """One benchmark case; ``mask_mod``/``score_mod`` already shifted for decode."""

    name: str
    mask_mod: Callable | None
    score_mod: Callable | None
    sdpa: str | None  # "full" | "causal" | None (SDPA cannot express it)
    analytic: Callable[[], Any] | None  # our analytic block-mask builder, if any
    params: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def doc_offsets(S: int, n_docs: int = NUM_DOCS, seed: int = DOC_SEED) -> torch.Tensor:
    """Random document boundaries ``[n + 1]`` (int64, ``0 .. S``), ``n = min(n_docs, S)``."""
    n = min(n_docs, S)
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(S - 1, generator=g)[: n - 1] + 1
    return torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([S])])


def build_variant(
    name: str, L: int, S: int, Hq: int, device: torch.device, window: int, prefix: int
) -> Variant:
    """Mods, SDPA equivalent and analytic builder for variant ``name`` (queries are the last
    ``L`` positions of ``S``)."""
    from . import block_mask as bmod

    off = S - L
    sources = []

    def mod(n: str, *a: Any, **kw: Any) -> Callable:
        fn, src = _mod(n, *a, **kw)
        sources.append(src)
        return fn

    mask = score = analytic = None
    sdpa: str | None = None
    params: dict[str, Any] = {}
    if name == "full":
        sdpa = "full"
    elif name in ("causal", "alibi", "softcap"):
        mask = mod("causal_mask")
        sdpa = "causal" if name == "causal" else None
        if hasattr(bmod, "create_causal_block_mask"):
            analytic = lambda: bmod.create_causal_block_mask(L, S, q_offset=off, device=device)
        if name == "alibi":
            lib = _lib()
            if lib is not None and hasattr(lib, "alibi_slopes_bloom"):
                try:
                    slopes = lib.alibi_slopes_bloom(Hq).to(device=device, dtype=torch.float32)
                except TypeError:
                    slopes = _bloom_slopes(Hq, device)
            else:
                slopes = _bloom_slopes(Hq, device)
            score = mod("alibi", slopes)
            params["slopes"] = "bloom"
        if name == "softcap":
            score = mod("softcap", SOFTCAP)
            params["softcap"] = SOFTCAP
    elif name == "sliding_window":
        mask = mod("sliding_window", window)
        params["window"] = window
        if hasattr(bmod, "create_sliding_window_block_mask"):
            analytic = lambda: bmod.create_sliding_window_block_mask(
                window, L, S, q_offset=off, device=device
            )
    elif name == "documents":
        offsets = doc_offsets(S)
        lens = (offsets[1:] - offsets[:-1]).tolist()
        params.update(num_docs=len(lens), doc_lengths=lens, seed=DOC_SEED)
        ids = (torch.searchsorted(offsets, torch.arange(S), right=True) - 1).to(device)
        mask = mod("document_mask", ids, causal=True)
        if hasattr(bmod, "create_document_block_mask"):
            dev_off = offsets.to(device)
            analytic = lambda: bmod.create_document_block_mask(
                offsets=dev_off, causal=True, Q_LEN=L, KV_LEN=S, q_offset=off, device=device
            )
    elif name == "prefix_lm":
        mask = mod("prefix_lm", prefix)
        params["prefix"] = prefix
    else:
        raise ValueError(f"--variants entries must be among {ALL_VARIANTS}, got {name!r}.")
    if off and sdpa == "causal":
        sdpa = "full"  # one query row at the end of the cache sees everything
    return Variant(
        name,
        _shift_q(mask, off, False),
        _shift_q(score, off, True),
        sdpa,
        analytic,
        params,
        ", ".join(sorted(set(sources))) or "-",
    )


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _time_ms(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: float,
    rep: float,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> float:
    """Median milliseconds per call: ``triton.testing.do_bench`` on CUDA, a wall clock on CPU
    (``warmup``/``rep`` are budgets in ms; at least three timed calls; the caller has made
    the first call already)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(
            do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
        )

    def call() -> float:
        for t in grad_to_none or ():
            t.grad = None
        return _wall(fn, device)[0]

    t_end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < t_end:
        call()
    times = [call() for _ in range(3)]
    t_end = time.perf_counter() + rep / 1e3
    while time.perf_counter() < t_end and len(times) < 1000:
        times.append(call())
    return statistics.median(times) * 1e3


def _median_s(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm (first-call costs are measured elsewhere)
    return statistics.median(_wall(fn, device)[0] for _ in range(repeats))


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# the implementations
# --------------------------------------------------------------------------------------------
_TORCH_FLEX_COMPILED: Callable | None = None


def _torch_flex(compile_: bool) -> Callable:
    global _TORCH_FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if not compile_:

        def eager_flex(*args: Any, **kwargs: Any) -> Any:
            with warnings.catch_warnings():  # "called without torch.compile": we know
                warnings.filterwarnings("ignore", message=".*without torch.compile.*")
                return flex_attention(*args, **kwargs)

        return eager_flex
    if _TORCH_FLEX_COMPILED is None:
        _TORCH_FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _TORCH_FLEX_COMPILED


def _raise_dynamo_limits() -> None:
    import torch._dynamo.config as dcfg

    for name, val in (
        ("cache_size_limit", 256),
        ("recompile_limit", 256),
        ("accumulated_cache_size_limit", 4096),
        ("accumulated_recompile_limit", 4096),
    ):
        if hasattr(dcfg, name) and getattr(dcfg, name) < val:
            setattr(dcfg, name, val)


def _sdpa_call(
    which: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, gqa: bool
) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if which == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
    F = torch.nn.functional

    def call() -> torch.Tensor:
        with sdpa_kernel(backend):
            if gqa:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    variants: list[str]
    heads: list[tuple[int, int, int]]
    seqlen: int
    batch: int
    dtype: torch.dtype
    directions: list[str]
    impls: list[str]
    out: str
    device: torch.device
    decode: bool
    warmup: float
    rep: float
    compile: bool
    our_backend: str
    window: int
    prefix: int
    build_repeats: int
    time_budget: float | None
    quick: bool


def _versions() -> dict[str, Any]:
    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "hf_flexattn"):
        try:
            v[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - report what is missing
            v[name] = None
    return v


def _header(cfg: Config, argv: Sequence[str]) -> dict[str, Any]:
    dev = cfg.device
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
    else:
        gpu, cap = f"CPU ({platform.processor() or platform.machine()})", None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu,
        "capability": cap,
        "versions": _versions(),
        "command": "hf-flexattn bench " + shlex.join(list(argv)),
        "config": {
            "variants": cfg.variants,
            "heads": [f"{a}/{b}/{c}" for a, b, c in cfg.heads],
            "seqlen": cfg.seqlen,
            "q_len": 1 if cfg.decode else cfg.seqlen,
            "batch": cfg.batch,
            "dtype": str(cfg.dtype).replace("torch.", ""),
            "directions": cfg.directions,
            "impls": cfg.impls,
            "decode": cfg.decode,
            "warmup_ms": cfg.warmup,
            "rep_ms": cfg.rep,
            "torch_flex_compiled": cfg.compile,
            "our_backend": cfg.our_backend,
            "window": cfg.window,
            "prefix": cfg.prefix,
            "num_docs": NUM_DOCS,
            "doc_seed": DOC_SEED,
            "softcap": SOFTCAP,
            "timer": "triton.testing.do_bench median"
            if dev.type == "cuda"
            else "wall clock median",
            "flops": "fwd = 4*pairs*D over allowed (b,h,q,kv) pairs; bwd = 2.5*fwd; "
            "fwdbwd = 3.5*fwd; bwd ms = fwdbwd ms - fwd ms",
        },
    }


def _heads_label(hd: tuple[int, int, int]) -> str:
    return f"{hd[0]}/{hd[1]}/{hd[2]}"


class _Runner:
    def __init__(self, cfg: Config, argv: Sequence[str]) -> None:
        self.cfg = cfg
        self.header = _header(cfg, argv)
        self.rows: list[dict[str, Any]] = []
        self.cells: list[dict[str, Any]] = []
        self.builds: dict[str, dict[str, Any]] = {}
        self.t_start = time.perf_counter()

    # -- bookkeeping --------------------------------------------------------------------------
    def over_budget(self) -> bool:
        tb = self.cfg.time_budget
        return tb is not None and time.perf_counter() - self.t_start > tb

    def cell(
        self,
        row: dict[str, Any],
        impl: str,
        direction: str,
        ms: float | None = None,
        error: str | None = None,
        note: str | None = None,
    ) -> None:
        tflops = None
        if ms is not None and ms > 0:
            tflops = attention_flops(row["pairs"], row["D"], direction) / (ms * 1e-3) / 1e12
        self.cells.append(
            {
                "variant": row["variant"],
                "heads": row["heads"],
                "impl": impl,
                "direction": direction,
                "ms": ms,
                "tflops": tflops,
                "error": error,
                "note": note,
            }
        )

    def derive_bwd(self, row: dict[str, Any], impl: str) -> None:
        got = {
            c["direction"]: c
            for c in self.cells
            if c["variant"] == row["variant"] and c["heads"] == row["heads"] and c["impl"] == impl
        }
        if "fwd" in got and "fwdbwd" in got:
            f, fb = got["fwd"]["ms"], got["fwdbwd"]["ms"]
            if f is not None and fb is not None and fb > f:
                self.cell(row, impl, "bwd", ms=fb - f, note="fwdbwd - fwd")
            elif f is not None and fb is not None:
                self.cell(row, impl, "bwd", error="fwdbwd not slower than fwd (timing noise)")

    # -- block-mask building (once per variant) -----------------------------------------------
    def build_times(self, var: Variant, L: int, S: int) -> dict[str, Any]:
        if var.name in self.builds:
            return self.builds[var.name]
        cfg, dev = self.cfg, self.cfg.device
        res: dict[str, Any] = {}
        if var.mask_mod is not None:
            from torch.nn.attention.flex_attention import create_block_mask as torch_cbm

            from . import block_mask as bmod

            jobs = {
                "ours_analytic": var.analytic,
                "ours_generic": lambda: bmod.create_block_mask(
                    var.mask_mod, None, None, L, S, device=dev
                ),
                "torch": lambda: torch_cbm(var.mask_mod, None, None, L, S, device=dev),
            }
            for key, job in jobs.items():
                if job is None:
                    continue
                try:
                    res[key + "_ms"] = _median_s(job, dev, cfg.build_repeats) * 1e3
                except Exception as e:  # noqa: BLE001 - record, keep going
                    res[key + "_error"] = _err(e)
                _free(dev)
        self.builds[var.name] = res
        return res

    # -- one row: variant x heads -------------------------------------------------------------
    def run_row(self, vname: str, hd: tuple[int, int, int]) -> None:
        cfg, dev = self.cfg, self.cfg.device
        Hq, Hkv, D = hd
        S = cfg.seqlen
        L = 1 if cfg.decode else S
        B = cfg.batch
        row: dict[str, Any] = {
            "variant": vname,
            "heads": _heads_label(hd),
            "model": HEAD_NAMES.get(hd, ""),
            "B": B,
            "Hq": Hq,
            "Hkv": Hkv,
            "D": D,
            "L": L,
            "S": S,
        }
        self.rows.append(row)
        directions = ["decode"] if cfg.decode else cfg.directions
        if self.over_budget():
            row["skipped"] = "time budget"
            for impl in cfg.impls:
                for d in directions:
                    self.cell(row, impl, d, error="skipped: --time-budget reached")
            return
        var = build_variant(vname, L, S, Hq, dev, cfg.window, cfg.prefix)
        row.update(params=var.params, mods_source=var.source)
        row["pairs"] = count_allowed_pairs(var.mask_mod, B, Hq, L, S, dev)
        row["density"] = row["pairs"] / (B * Hq * L * S)
        row["mask_build"] = self.build_times(var, L, S)

        gen = torch.Generator(device=dev).manual_seed(0)
        grad = not cfg.decode

        def rnd(*shape: int) -> torch.Tensor:
            t = torch.randn(*shape, generator=gen, device=dev, dtype=cfg.dtype)
            return t.requires_grad_(grad)

        q, k, v = rnd(B, Hq, L, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
        dout = torch.randn(B, Hq, L, D, generator=gen, device=dev, dtype=cfg.dtype)
        gqa = Hq != Hkv
        outs: dict[str, torch.Tensor] = {}
        first: dict[str, Any] = {}
        row["first_call_s"] = first

        for impl in cfg.impls:
            if impl.startswith("sdpa") and var.sdpa is None:
                continue  # SDPA cannot express this variant: no cell
            if self.over_budget():
                for d in directions:
                    self.cell(row, impl, d, error="skipped: --time-budget reached")
                continue
            try:
                fn, note = self._make(impl, var, q, k, v, L, S, gqa)
                g_ok, bwd_err = grad, None
                try:
                    with torch.set_grad_enabled(grad):
                        t_f, out = _wall(fn, dev)
                except Exception as e:  # noqa: BLE001 - e.g. no backward on this device
                    if not grad:
                        raise
                    # retry as an inference forward; fwdbwd is then unsupported
                    g_ok, bwd_err = False, _err(e)
                    qd, kd, vd = q.detach(), k.detach(), v.detach()
                    fn, note = self._make(impl, var, qd, kd, vd, L, S, gqa)
                    with torch.no_grad():
                        t_f, out = _wall(fn, dev)
                    note = "; ".join(x for x in (note, "fwd without grad") if x)
                t_b = None
                if g_ok and "fwdbwd" in directions:
                    try:
                        t_b, _ = _wall(lambda o=out, g=dout: o.backward(g), dev)
                    except Exception as e:  # noqa: BLE001
                        bwd_err = _err(e)
                if impl in ("ours", "torch_flex"):
                    first[impl] = {"fwd": t_f, "bwd": t_b}
                outs[impl] = out.detach().float()
                del out
            except Exception as e:  # noqa: BLE001 - unsupported / OOM / compile error
                for d in directions:
                    self.cell(row, impl, d, error=_err(e))
                logger.info("%s %s %s: %s", vname, row["heads"], impl, _err(e))
                _free(dev)
                continue
            for d in directions:
                if d == "fwdbwd" and bwd_err is not None:
                    self.cell(row, impl, d, error=bwd_err, note=note)
                    continue
                try:
                    if d == "fwdbwd":
                        call = lambda fn=fn, g=dout: fn().backward(g)
                        ms = _time_ms(call, dev, cfg.warmup, cfg.rep, grad_to_none=[q, k, v])
                    else:
                        with torch.set_grad_enabled(g_ok):
                            ms = _time_ms(fn, dev, cfg.warmup, cfg.rep)
                    self.cell(row, impl, d, ms=ms, note=note)
                except Exception as e:  # noqa: BLE001
                    self.cell(row, impl, d, error=_err(e), note=note)
                    _free(dev)
            if "fwd" in directions and "fwdbwd" in directions:
                self.derive_bwd(row, impl)
            for t in (q, k, v):
                t.grad = None
        if "ours" in outs:
            ref = next(
                (outs[i] for i in ("torch_flex", "sdpa_flash", "sdpa_cudnn") if i in outs), None
            )
            if ref is not None:
                row["max_abs_diff_vs_ref"] = float((outs["ours"] - ref).abs().max())
        del outs, q, k, v, dout
        _free(dev)

    def _make(
        self,
        impl: str,
        var: Variant,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        L: int,
        S: int,
        gqa: bool,
    ) -> tuple[Callable[[], torch.Tensor], str | None]:
        cfg, dev = self.cfg, self.cfg.device
        if impl == "ours":
            from . import block_mask as bmod
            from .api import flex_attention as ours

            if var.mask_mod is None:
                bm, note = None, None
            elif var.analytic is not None:
                bm, note = var.analytic(), "analytic block mask"
            else:
                bm, note = bmod.create_block_mask(var.mask_mod, None, None, L, S, device=dev), None
            opts = {"backend": cfg.our_backend}
            return (
                lambda: ours(
                    q,
                    k,
                    v,
                    score_mod=var.score_mod,
                    block_mask=bm,
                    enable_gqa=gqa,
                    kernel_options=opts,
                )
            ), note
        if impl == "torch_flex":
            from torch.nn.attention.flex_attention import create_block_mask as torch_cbm

            if cfg.compile:
                import torch._dynamo as dynamo  # (a bare `import torch.x` would shadow torch)

                dynamo.reset()  # fresh compile per row: first-call time is comparable
            fx = _torch_flex(cfg.compile)
            bm = None
            if var.mask_mod is not None:
                bm = torch_cbm(var.mask_mod, None, None, L, S, device=dev)
            return (
                lambda: fx(q, k, v, score_mod=var.score_mod, block_mask=bm, enable_gqa=gqa)
            ), None
        if impl in ("sdpa_flash", "sdpa_cudnn"):
            causal = var.sdpa == "causal"
            call = _sdpa_call(impl, q, k, v, causal, gqa)
            if not gqa:
                return call, None
            try:
                with torch.no_grad():
                    call()
                return call, None
            except RuntimeError:
                # this SDPA backend has no GQA path: give it K/V expanded to Hq heads
                rep = q.shape[1] // k.shape[1]
                ke = k.detach().repeat_interleave(rep, 1).requires_grad_(k.requires_grad)
                ve = v.detach().repeat_interleave(rep, 1).requires_grad_(v.requires_grad)
                return _sdpa_call(impl, q, ke, ve, causal, False), "K/V expanded to Hq heads"
        raise ValueError(f"--impls entries must be among {ALL_IMPLS}, got {impl!r}.")

    # -- output -------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        return {
            "header": self.header,
            "rows": self.rows,
            "cells": self.cells,
            "elapsed_s": time.perf_counter() - self.t_start,
        }

    def write(self, plot: bool = False) -> dict[str, str]:
        return write_results(self.payload(), self.cfg.out, plot=plot)


CSV_FIELDS = ["variant", "heads", "impl", "direction", "ms", "tflops", "error", "note"]


def write_results(res: dict[str, Any], out: str, plot: bool = True) -> dict[str, str]:
    """Write ``results.json``, ``results.csv`` (and ``results.png`` if ``plot``) into ``out``;
    returns the paths written."""
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"results.{k}") for k in ("json", "csv", "png")}
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for c in res["cells"]:
            w.writerow({k: c.get(k) for k in CSV_FIELDS})
    if plot:
        try:
            plot_results(res, paths["png"])
        except Exception as e:  # noqa: BLE001 - e.g. no matplotlib: keep the numbers
            logger.warning("no plot (%s); re-plot later with --from-json", _err(e))
            print(f"# no plot: {_err(e)} (re-plot later with --from-json)", file=sys.stderr)
            del paths["png"]
    else:
        del paths["png"]
    return paths


def load_results(paths: Sequence[str]) -> dict[str, Any]:
    """Read one or more ``results.json`` files (e.g. a run split by ``--heads``) into one.

    Rows and cells are concatenated; impls and directions are the union; the header is the
    first file's, with every file's command under ``"commands"``.
    """
    merged: dict[str, Any] | None = None
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        if not isinstance(d, dict) or not {"header", "rows", "cells"} <= set(d):
            raise ValueError(f"--from-json expects results.json files of this bench, got {p!r}.")
        if merged is None:
            merged = {"header": json.loads(json.dumps(d["header"])), "rows": [], "cells": []}
            merged["header"]["commands"] = []
        cfg, mcfg = d["header"]["config"], merged["header"]["config"]
        if cfg["decode"] != mcfg["decode"]:
            raise ValueError(f"--from-json: cannot merge decode and non-decode results ({p!r}).")
        for key in ("impls", "directions", "variants", "heads"):
            mcfg[key] = mcfg[key] + [x for x in cfg[key] if x not in mcfg[key]]
        merged["header"]["commands"].append(d["header"]["command"])
        merged["rows"] += d["rows"]
        merged["cells"] += d["cells"]
    if merged is None:
        raise ValueError("--from-json needs at least one file.")
    return merged


# --------------------------------------------------------------------------------------------
# table and plot
# --------------------------------------------------------------------------------------------
def _lookup(cells: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    return {(c["variant"], c["heads"], c["impl"], c["direction"]): c for c in cells}


def _directions_of(res: dict[str, Any]) -> list[str]:
    cfg = res["header"]["config"]
    if cfg["decode"]:
        return ["decode"]
    ds = list(cfg["directions"])
    if "fwd" in ds and "fwdbwd" in ds:
        ds.insert(ds.index("fwdbwd"), "bwd")
    return ds


def _fmt_tflops(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _fmt_rows(head: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*vals) for vals in lines
    ]


def format_table(res: dict[str, Any]) -> str:
    """One block per direction: rows = variant x heads, columns = impls as ``TFLOPs ms``.

    ``err`` marks a failed cell (listed at the end), ``skip`` one skipped by the time
    budget, ``-`` one not run (SDPA cannot express the variant).
    """
    look = _lookup(res["cells"])
    impls = res["header"]["config"]["impls"]
    out: list[str] = []
    for d in _directions_of(res):
        head = ["variant", "heads", "density"] + [f"{i} TFLOPs  ms" for i in impls]
        lines = []
        for row in res["rows"]:
            vals = [
                row["variant"],
                row["heads"],
                f"{row['density']:.3f}" if "density" in row else "-",
            ]
            for i in impls:
                c = look.get((row["variant"], row["heads"], i, d))
                if c is None:
                    vals.append("-")
                elif c["error"]:
                    vals.append("skip" if c["error"].startswith("skipped") else "err")
                else:
                    tf = "-" if c["tflops"] is None else _fmt_tflops(c["tflops"])
                    vals.append(f"{tf:>7}  {c['ms']:.3f}")
            lines.append(vals)
        note = " (= fwdbwd - fwd)" if d == "bwd" else ""
        out += [f"== {d}{note}: TFLOPs over allowed pairs, median ms"]
        out += _fmt_rows(head, lines) + [""]

    # second table: mask build, first call, accuracy
    ext_head = [
        "variant",
        "heads",
        "build ms (ours analytic/generic, torch)",
        "first call s (ours fwd+bwd, torch fwd+bwd)",
        "max|ours-ref|",
    ]
    ext = []
    for row in res["rows"]:
        mb = row.get("mask_build", {})

        def ms(key: str, mb: dict = mb) -> str:
            if key + "_ms" in mb:
                return f"{mb[key + '_ms']:.1f}"
            return "err" if key + "_error" in mb else "-"

        fc = row.get("first_call_s", {})

        def fs(impl: str, fc: dict = fc) -> str:
            if impl not in fc:
                return "-"
            f, b = fc[impl]["fwd"], fc[impl]["bwd"]
            return f"{f:.2f}" + (f"+{b:.2f}" if b is not None else "")

        diff = row.get("max_abs_diff_vs_ref")
        ext.append(
            [
                row["variant"],
                row["heads"],
                f"{ms('ours_analytic')}/{ms('ours_generic')}, {ms('torch')}",
                f"{fs('ours')}, {fs('torch_flex')}",
                "-" if diff is None else f"{diff:.3g}",
            ]
        )
    out += ["== mask build, first call (incl. tracing / codegen / compile), accuracy"]
    out += _fmt_rows(ext_head, ext)
    errs = [c for c in res["cells"] if c["error"] and not c["error"].startswith("skipped")]
    if errs:
        out += ["", "errors:"]
        out += [
            f"  {c['variant']} {c['heads']} {c['impl']} {c['direction']}: {c['error']}"
            for c in errs
        ]
    return "\n".join(out)


def plot_results(res: dict[str, Any], path: str) -> None:
    """Grouped bars of TFLOPs (rows x impls), one subplot per direction, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    look = _lookup(res["cells"])
    dirs = _directions_of(res)
    cfg = res["header"]["config"]
    impls, rows = cfg["impls"], res["rows"]
    labels = [f"{row['variant']}\n{row['heads']}" for row in rows]
    n, m = len(labels), len(impls)
    fig, axes = plt.subplots(
        len(dirs),
        1,
        figsize=(min(24.0, max(8.0, 0.3 * n * max(m, 2))), 3.6 * len(dirs)),
        squeeze=False,
    )
    width = 0.8 / max(m, 1)
    for ax, d in zip(axes[:, 0], dirs):
        for j, impl in enumerate(impls):
            ys = []
            for row in rows:
                c = look.get((row["variant"], row["heads"], impl, d))
                ys.append(c["tflops"] if c and c["tflops"] is not None else 0.0)
            xs = [i + (j - (m - 1) / 2) * width for i in range(n)]
            ax.bar(xs, ys, width=width, label=impl)
        ax.set_title(
            f"{d} ({res['header']['device']}, {cfg['dtype']}, "
            f"L={cfg['q_len']}, S={cfg['seqlen']}, B={cfg['batch']})"
        )
        ax.set_ylabel("TFLOPs (allowed pairs)")
        ax.set_xticks(range(n))
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncols=min(m, 4))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _csv_list(arg: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [x.strip() for x in arg.split(",") if x.strip()]
    if arg.strip() == "all":
        return list(allowed)
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(
            f"{flag} must be a comma list from {list(allowed)} (or 'all'), got {arg!r}."
        )
    return items


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-flexattn bench",
        description="Time hf_flexattn next to torch's compiled FlexAttention and SDPA.",
    )
    p.add_argument("--variants", default="all", help=f"comma list from {ALL_VARIANTS}")
    p.add_argument(
        "--heads", default=None, help=f"comma list of Hq/Hkv/D (default {DEFAULT_HEADS})"
    )
    p.add_argument("--seqlen", type=int, default=None, help="sequence (cache) length S, 8192")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--dtype", default=None, choices=sorted(_DTYPES), help="bf16 (fp32 with --quick)"
    )
    p.add_argument(
        "--directions",
        default="fwd,fwdbwd",
        help="comma list from fwd,fwdbwd (bwd = fwdbwd - fwd when both)",
    )
    p.add_argument("--impls", default="all", help=f"comma list from {ALL_IMPLS}")
    p.add_argument(
        "--decode",
        action="store_true",
        help="one query row against an S-token cache (forward only)",
    )
    p.add_argument("--out", default="bench_out", help="output folder (default ./bench_out)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--warmup", type=float, default=None, help="warmup budget per cell, ms (25)")
    p.add_argument("--rep", type=float, default=None, help="timing budget per cell, ms (100)")
    p.add_argument("--window", type=int, default=None, help=f"sliding window ({WINDOW})")
    p.add_argument("--prefix", type=int, default=None, help="prefix-LM prefix length (S/4)")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="run torch's flex_attention eagerly (implied by --quick)",
    )
    p.add_argument(
        "--our-backend",
        default=None,
        choices=["triton", "torch"],
        help="backend of ours (triton on CUDA, torch on CPU)",
    )
    p.add_argument(
        "--build-repeats", type=int, default=3, help="timed repeats of each block-mask build"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; cells not started by then are recorded as skipped",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="JSON",
        help="measure nothing: merge these results.json files, print the table "
        "and write JSON/CSV/PNG into --out",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny CPU smoke run: S=192, heads 2/2/16,2/1/16, fp32, eager torch flex",
    )
    return p


def resolve_device(arg: str | None, quick: bool) -> torch.device:
    """``--device``, else CUDA when available and not ``--quick``, else the CPU."""
    if arg is not None:
        device = torch.device(arg)
    elif quick or not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device must be an available device, got {arg!r} but CUDA is not available."
        )
    return device


def _config(args: argparse.Namespace) -> Config:
    q = args.quick
    device = resolve_device(args.device, q)
    seqlen = args.seqlen if args.seqlen is not None else (192 if q else 8192)
    heads = parse_heads(args.heads or ("2/2/16,2/1/16" if q else DEFAULT_HEADS))
    for name, val in (
        ("--seqlen", seqlen),
        ("--batch", args.batch),
        ("--build-repeats", args.build_repeats),
    ):
        if val < 1:
            raise ValueError(f"{name} must be a positive int, got {val}.")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float32 if q else torch.bfloat16)
    directions = (
        ["fwd"] if args.decode else _csv_list(args.directions, ALL_DIRECTIONS, "--directions")
    )
    window = args.window if args.window is not None else (min(WINDOW, max(1, seqlen // 4)))
    prefix = args.prefix if args.prefix is not None else max(1, seqlen // 4)
    for name, val in (("--window", window), ("--prefix", prefix)):
        if val < 1:
            raise ValueError(f"{name} must be a positive int, got {val}.")
    return Config(
        variants=_csv_list(args.variants, ALL_VARIANTS, "--variants"),
        heads=heads,
        seqlen=seqlen,
        batch=args.batch,
        dtype=dtype,
        directions=directions,
        impls=_csv_list(args.impls, ALL_IMPLS, "--impls"),
        out=args.out,
        device=device,
        decode=args.decode,
        warmup=args.warmup if args.warmup is not None else (1.0 if q else 25.0),
        rep=args.rep if args.rep is not None else (5.0 if q else 100.0),
        compile=not (args.no_compile or q or device.type != "cuda"),
        our_backend=args.our_backend or ("triton" if device.type == "cuda" else "torch"),
        window=window,
        prefix=prefix,
        build_repeats=1 if q else args.build_repeats,
        time_budget=args.time_budget,
        quick=q,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (``hf-flexattn bench [options]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [os.fspath(a) for a in argv]
    if argv[:1] == ["--"]:  # `hf-flexattn bench -- --quick ...`
        argv = argv[1:]
    parser = _parser()
    args = parser.parse_args(argv)
    if args.from_json:
        try:
            res = load_results(args.from_json)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        paths = write_results(res, args.out, plot=not args.no_plot)
        print(format_table(res))
        print(f"\nwrote {', '.join(paths.values())}")
        return 0
    try:
        cfg = _config(args)
    except ValueError as e:
        parser.error(str(e))
    if cfg.compile:
        _raise_dynamo_limits()
    runner = _Runner(cfg, argv)
    print(f"# hf-flexattn bench  {runner.header['date']}  {runner.header['device']}")
    print(f"# versions: {json.dumps(runner.header['versions'])}")
    print(f"# command: {runner.header['command']}", flush=True)
    try:
        for vname in cfg.variants:
            for hd in cfg.heads:
                t0 = time.perf_counter()
                runner.run_row(vname, hd)
                runner.write()
                print(
                    f"  done {vname:<15} {_heads_label(hd):<12} {time.perf_counter() - t0:6.1f}s",
                    flush=True,
                )
    finally:
        paths = runner.write(plot=not args.no_plot)
    print()
    print(format_table(runner.payload()))
    print(f"\nwrote {', '.join(paths.values())}  ({time.perf_counter() - runner.t_start:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
