"""Kernel block-config sweep on the training step's attention, beside torch's compiled
FlexAttention in the same run.

The shape is the end-to-end benchmark's (``hf_flexattn.bench_e2e``): one packed row of
``--tokens`` tokens of random-length causal documents (``make_documents``, same seed), q/kv
heads and head dim from ``--heads``, bf16; the BlockMask is the one the Transformers
integration builds from ``cu_seq_lens``. Times forward configs, then dK/dV and dQ configs
of the backward (``fwdbwd - fwd``, the other kernel at its default), and prints each with its
largest difference from torch's output and gradients.

    python examples/benchmarks/config_sweep.py                     # the e2e training shape
    python examples/benchmarks/config_sweep.py --heads 64/8/128 --tokens 8192 --json out.json
    python examples/benchmarks/config_sweep.py --quick             # tiny, CPU interpreter ok
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hf_flexattn import flex_attention
from hf_flexattn.bench import _time_ms, _torch_flex, attention_flops, parse_heads
from hf_flexattn.bench_e2e import make_documents
from hf_flexattn.integrations import transformers as integ

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
       (128, 32, 4, 3), (64, 64, 4, 3)]
DKDV = [(64, 128, 8, 3), (64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
        (32, 64, 4, 3)]
DQ = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3)]
# the backward as one launch (default when both kernels' warps and stages agree) or two
FUSED = [("two launches", {"bwd_fused": False}),
         ("fused, dkdv 32x64", {"bwd_fused": True, "bwd_BLOCK_M": 32, "bwd_BLOCK_N": 64}),
         ("fused, dkdv 64x64", {"bwd_fused": True, "bwd_BLOCK_M": 64, "bwd_BLOCK_N": 64})]
KINDS = ("fwd", "fwd_tma", "dkdv", "dq", "fused")
QUICK = [(16, 16, 4, 1), (32, 16, 4, 1)]


def _opts(prefix: str, cfg: tuple[int, int, int, int]) -> dict[str, int]:
    return dict(zip((prefix + f for f in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")),
                    cfg))


def _cfg_label(cfg: tuple[int, int, int, int]) -> str:
    return "{}x{} w{} s{}".format(*cfg)


def _maxdiff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def run(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    (hq, hkv, d), = parse_heads(args.heads)
    L = args.tokens
    docs = make_documents(L, args.doc_min, args.doc_max, vocab=128, seed=args.seed)
    cu = torch.tensor(docs.offsets, dtype=torch.int32, device=dev)
    integ.BLOCK_SIZE = args.block
    bm = integ._document_mask(cu, "cu", 1, L, None, dev)
    g = torch.Generator(device=dev).manual_seed(0)

    def make(h: int, grad: bool) -> torch.Tensor:
        # "blhd": [1, h, L, d] views of [1, L, h, d] memory, the layout Transformers' attention
        # modules pass (projections viewed per head, then transposed; the output gradient too)
        if args.layout == "blhd":
            t = torch.randn(1, L, h, d, device=dev, dtype=dtype, generator=g).transpose(1, 2)
        else:
            t = torch.randn(1, h, L, d, device=dev, dtype=dtype, generator=g)
        return t.requires_grad_() if grad else t

    q, k, v, do = make(hq, True), make(hkv, True), make(hkv, True), make(hq, False)
    lens = docs.lengths
    pairs = hq * sum(n * (n + 1) // 2 for n in lens)
    warm, rep = (5, 20) if args.quick else (25, 100)

    def fwd_fn(fn: Callable) -> Callable:
        def call() -> torch.Tensor:
            with torch.no_grad():
                return fn(q, k, v)
        return call

    def fwdbwd_fn(fn: Callable) -> Callable:
        def call() -> None:
            fn(q, k, v).backward(do)
        return call

    def grads(fn: Callable) -> list[torch.Tensor]:
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.backward(do)
        return [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]

    rows: list[dict[str, Any]] = []

    def record(kind: str, label: str, fwd_ms: float, total_ms: float | None, diff: float) -> None:
        row = {"kind": kind, "config": label, "fwd_ms": fwd_ms, "fwdbwd_ms": total_ms,
               "max_diff_vs_torch": diff}
        row["fwd_tflops"] = attention_flops(pairs, d, "fwd") / fwd_ms / 1e9
        if total_ms is not None:
            row["bwd_ms"] = total_ms - fwd_ms
            row["bwd_tflops"] = attention_flops(pairs, d, "bwd") / row["bwd_ms"] / 1e9
        rows.append(row)
        bwd = ""
        if total_ms is not None:
            bwd = f"  bwd {row['bwd_ms']:8.3f} ms {row['bwd_tflops']:6.1f} TF"
        print(f"{kind:<10} {label:<16} fwd {fwd_ms:8.3f} ms {row['fwd_tflops']:6.1f} TF{bwd}"
              f"  max|diff| {diff:.3g}", flush=True)

    # torch's compiled flex_attention on the same mask (torch's BlockMask type: ours is one)
    ref_out = None
    if dev.type == "cuda" and not args.no_torch:
        tf = _torch_flex(True)
        torch_fn = lambda q, k, v: tf(q, k, v, block_mask=bm, enable_gqa=hq != hkv)  # noqa: E731
        ref_out = grads(torch_fn)
        f_ms = _time_ms(fwd_fn(torch_fn), dev, warm, rep)
        t_ms = _time_ms(fwdbwd_fn(torch_fn), dev, warm, rep, grad_to_none=[q, k, v])
        record("torch_flex", "compiled", f_ms, t_ms, 0.0)
    elif dev.type != "cuda":  # CPU: our torch backend is the reference
        ref_out = grads(lambda q, k, v: flex_attention(
            q, k, v, block_mask=bm, enable_gqa=hq != hkv, kernel_options={"backend": "torch"}))

    def ours(opts: dict[str, int]) -> Callable:
        return lambda q, k, v: flex_attention(q, k, v, block_mask=bm, enable_gqa=hq != hkv,
                                              kernel_options={"backend": "triton", **opts})

    def measure(kind: str, label: str, opts: dict[str, int], with_bwd: bool) -> None:
        fn = ours(opts)
        try:
            got = grads(fn)
            f_ms = _time_ms(fwd_fn(fn), dev, warm, rep)
            t_ms = _time_ms(fwdbwd_fn(fn), dev, warm, rep, grad_to_none=[q, k, v]) if (
                with_bwd) else None
        except Exception as e:  # a config the kernel or the GPU cannot take
            print(f"{kind:<10} {label:<16} failed: {type(e).__name__}: {str(e)[:160]}")
            rows.append({"kind": kind, "config": label, "error": str(e)[:300]})
            return
        diff = _maxdiff(got, ref_out) if ref_out is not None else float("nan")
        record(kind, label, f_ms, t_ms, diff)

    kinds = set(args.kinds.split(","))
    measure("default", "default", {}, True)
    if "fwd" in kinds:
        for cfg in QUICK if args.quick else FWD:
            measure("fwd", _cfg_label(cfg), _opts("", cfg), False)
        measure("fwd", "default tma", {"tma": True}, False)  # K/V via tensor descriptors
    if "fwd_tma" in kinds:  # each forward config with K/V through descriptors, and without
        for cfg in QUICK if args.quick else FWD:
            measure("fwd_tma", _cfg_label(cfg), {**_opts("", cfg), "tma": True}, False)
            measure("fwd_ptr", _cfg_label(cfg), {**_opts("", cfg), "tma": False}, False)
    if "dkdv" in kinds:
        for cfg in QUICK if args.quick else DKDV:
            measure("bwd_dkdv", _cfg_label(cfg), _opts("bwd_", cfg), True)
    if "dq" in kinds:
        for cfg in QUICK if args.quick else DQ:
            measure("bwd_dq", _cfg_label(cfg), _opts("bwd_dq_", cfg), True)
    if "fused" in kinds:
        for label, opts in FUSED[:1] if args.quick else FUSED:
            measure("bwd_fused", label, opts, True)
    header = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "heads": args.heads, "tokens": L, "documents": len(lens),
        "density": 2 * pairs / hq / (L * L), "dtype": str(dtype), "layout": args.layout,
        "argv": sys.argv[1:],
    }
    try:
        import triton

        header["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        pass
    return {"header": header, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default="16/8/128", help="Hq/Hkv/D (default: the e2e model's)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--doc-min", type=int, default=256)
    p.add_argument("--doc-max", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("bhld", "blhd"), default="bhld",
                   help="q/k/v/grad memory: contiguous [B, H, L, D], or Transformers' [B, L, H, D]")
    p.add_argument("--block", type=int, default=128, help="BlockMask block size")
    p.add_argument("--no-torch", action="store_true", help="skip torch's flex_attention")
    p.add_argument("--quick", action="store_true", help="tiny shape and configs (CPU ok)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--kinds", default="fwd,dkdv,dq,fused",
                   help=f"what to sweep besides the defaults: a comma list of {KINDS}")
    args = p.parse_args(argv)
    unknown = set(args.kinds.split(",")) - set(KINDS)
    if unknown:
        p.error(f"unknown --kinds {sorted(unknown)}; choose from {KINDS}")
    if args.quick:
        args.heads, args.tokens, args.doc_min, args.doc_max, args.block = "2/1/16", 96, 8, 40, 32
    res = run(args)
    print(json.dumps(res["header"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    ok = [r for r in res["rows"] if "error" not in r]
    return 0 if ok and all(math.isfinite(r["fwd_ms"]) for r in ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
