"""Dense reference attention and the error-ratio tolerance used by every backend's tests.

``reference_attention`` builds the full ``[B, Hq, L, S]`` score matrix, evaluates the mods on
it (torch's vmap semantics, through :mod:`hf_flexattn._mod_eval`) and runs a plain softmax.
By default the math is float64; ``compute_dtype`` runs the same math in a low precision,
which is the baseline that sets the tolerance in :func:`assert_close_by_ratio`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hf_flexattn._mod_eval import eval_mask_mod, eval_score_mod

__all__ = ["reference_attention", "assert_close_by_ratio", "default_floor", "max_abs_error"]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with mods.

    q ``[B, Hq, L, E]``, k ``[B, Hkv, S, E]``, v ``[B, Hkv, S, Ev]`` are cast to
    ``compute_dtype`` (differentiably) and all math runs in it. Returns
    ``out [B, Hq, L, Ev]`` and ``lse [B, Hq, L]`` (natural log), both in ``compute_dtype``;
    fully masked rows give out 0 and lse ``-inf``, with zero (never NaN) gradients.
    """
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(f"Hq={Hq} != Hkv={Hkv} needs enable_gqa=True")
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    dev = q.device
    b, h = torch.arange(B, device=dev), torch.arange(Hq, device=dev)
    qi, ki = torch.arange(L, device=dev), torch.arange(S, device=dev)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = None if mask_mod is None else eval_mask_mod(mask_mod, b, h, qi, ki)
    if score_mod is not None:
        if allowed is not None:
            # masked positions reach score_mod through a detached copy, so a score_mod that
            # is NaN/inf there cannot leak NaN into the gradient of the scores
            s = torch.where(allowed, s, s.detach())
        s = eval_score_mod(score_mod, s, b, h, qi, ki).to(compute_dtype)
    if allowed is not None:
        s = torch.where(allowed, s, torch.tensor(float("-inf"), dtype=s.dtype, device=dev))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    seen = l > 0
    l_safe = torch.where(seen, l, torch.ones_like(l))
    out = torch.matmul(e / l_safe, v)
    lse = torch.where(
        seen, m + torch.log(l_safe), torch.tensor(float("-inf"), dtype=s.dtype, device=dev)
    ).squeeze(-1)
    return out, lse


def default_floor(dtype: torch.dtype) -> float:
    """Relative error floor (times the reference's max magnitude) for ``dtype``."""
    return {
        torch.float64: 1e-10,
        torch.float32: 1e-5,
        torch.float16: 1e-4,
        torch.bfloat16: 1e-3,
    }.get(dtype, 1e-5)


def max_abs_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |a - ref| over positions where ``ref`` is finite (0.0 if there are none)."""
    a, ref = a.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    return (a[fin] - ref[fin]).abs().max().item()


def assert_close_by_ratio(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    low_precision_baseline: torch.Tensor,
    name: str,
    floor: float | None = None,
    ratio: float = 2.0,
) -> None:
    """Assert ``err(actual) <= ratio * err(baseline) + floor * max|ref|``.

    ``err`` is the max absolute error against ``ref64`` (the float64 reference) over finite
    reference entries; non-finite reference entries (``-inf`` lse of empty rows) must be
    matched exactly. ``low_precision_baseline`` is the same math done by plain PyTorch in
    the low precision of ``actual`` (``reference_attention(..., compute_dtype=dtype)``).
    ``floor`` defaults to :func:`default_floor` of ``actual.dtype``. ``actual`` must not
    contain NaN where the reference has none.
    """
    if actual.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}")
    a = actual.detach().double().cpu()
    r = ref64.detach().double().cpu()
    base = low_precision_baseline.detach().double().cpu()
    nan_bad = torch.isnan(a) & ~torch.isnan(r)
    if nan_bad.any():
        raise AssertionError(f"{name}: {int(nan_bad.sum())} NaN entries (reference has none)")
    nonfin = ~torch.isfinite(r)
    if nonfin.any():
        same = (a[nonfin] == r[nonfin]) | (torch.isnan(a[nonfin]) & torch.isnan(r[nonfin]))
        if not same.all():
            raise AssertionError(
                f"{name}: {int((~same).sum())} entries where the reference is non-finite "
                f"differ (e.g. got {a[nonfin][~same][:4].tolist()}, "
                f"want {r[nonfin][~same][:4].tolist()})"
            )
    if (~torch.isfinite(a) & torch.isfinite(r)).any():
        raise AssertionError(f"{name}: non-finite entries where the reference is finite")
    if floor is None:
        floor = default_floor(actual.dtype)
    fin = torch.isfinite(r)
    scale = r[fin].abs().max().item() if fin.any() else 0.0
    err = max_abs_error(a, r)
    base_err = max_abs_error(base, r)
    tol = ratio * base_err + floor * max(scale, 1e-6)
    if not err <= tol:
        raise AssertionError(
            f"{name}: max abs error {err:.3e} > {ratio} x baseline error {base_err:.3e} "
            f"+ floor {floor:.1e} x max|ref| {scale:.3e} (tol {tol:.3e})"
        )
