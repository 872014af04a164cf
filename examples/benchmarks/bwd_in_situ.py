"""Backward kernel time in isolation and between matmul bursts, ours against torch's flex.

Inside the end-to-end training step, our fused backward kernel took 1.81 ms per layer
(profiler), against 1.65-1.68 ms for the whole backward in ``config_sweep.py``; torch's
backward kernel took 1.72 ms there. This script times the backward kernels by name under
``torch.profiler`` on the training row (16/8 heads of 128, 16k tokens of documents,
Transformers' ``[B, L, H, D]`` memory layout, bf16), first back to back, then with a burst
of the step's matmul shapes before each call (the GPU's clocks and L2 as they are inside a
training step), and prints the SM clock where NVML is available.

    python examples/benchmarks/bwd_in_situ.py [--iters 10] [--no-torch] [--order torch,ours]
    TRITON_INTERPRET=1 python examples/benchmarks/bwd_in_situ.py --quick   # CPU smoke run
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from hf_flexattn import flex_attention
from hf_flexattn.bench import _torch_flex
from hf_flexattn.bench_e2e import make_documents
from hf_flexattn.integrations import transformers as integ

_BWD = ("flex_bwd", "backward")


def _clock() -> str:
    try:
        return f"{torch.cuda.clock_rate()} MHz" if torch.cuda.is_available() else "n/a (CPU)"
    except Exception as e:  # no NVML
        return f"n/a ({type(e).__name__})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--order", default="ours,torch",
                   help="comma-separated run order (the GPU clock drifts over a run)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (no timings)")
    args = p.parse_args()
    if args.quick:
        dev, dt = torch.device("cpu"), torch.float16
        (L, hq, hkv, d), hid, ffn = (96, 2, 1, 16), 32, 64
        docs = make_documents(L, 16, 48, vocab=128, seed=0)
        args.no_torch, args.iters = True, 1
    else:
        dev, dt = torch.device("cuda"), torch.bfloat16
        (L, hq, hkv, d), hid, ffn = (16384, 16, 8, 128), 2048, 5632
        docs = make_documents(L, 256, 4096, vocab=128, seed=0)
    cu = torch.tensor(docs.offsets, dtype=torch.int32, device=dev)
    bm = integ._document_mask(cu, "cu", 1, L, None, dev)
    g = torch.Generator(device=dev).manual_seed(0)

    def blhd(h: int) -> torch.Tensor:
        return torch.randn(1, L, h, d, device=dev, dtype=dt, generator=g).transpose(1, 2)

    q, k, v = blhd(hq).requires_grad_(), blhd(hkv).requires_grad_(), blhd(hkv).requires_grad_()
    do = blhd(hq)
    x = torch.randn(L, hid, device=dev, dtype=dt)
    w1 = torch.randn(hid, ffn, device=dev, dtype=dt) / hid**0.5
    w2 = torch.randn(ffn, hid, device=dev, dtype=dt) / ffn**0.5

    def burst() -> None:
        for _ in range(6):
            (x @ w1) @ w2

    impls = {"ours": lambda: flex_attention(q, k, v, block_mask=bm, enable_gqa=True)}
    if not args.no_torch:
        tf = _torch_flex(True)
        impls["torch"] = lambda: tf(q, k, v, block_mask=bm, enable_gqa=True)
    impls = {n: impls[n] for n in args.order.split(",") if n in impls}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"SM clock at start: {_clock()}")
    for name, fn in impls.items():
        for _ in range(3):
            fn().backward(do)
        for cond in ("back to back", "after matmuls"):
            sync()
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as pr:
                for _ in range(args.iters):
                    if cond == "after matmuls":
                        burst()
                    for t in (q, k, v):
                        t.grad = None
                    fn().backward(do)
                sync()
            times: dict[str, float] = defaultdict(float)
            for e in pr.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    times[e.name] += e.device_time / 1e3 / args.iters  # ms per call
            bwd = {n: t for n, t in times.items() if any(s in n for s in _BWD)}
            attn = {n: t for n, t in times.items() if "flex" in n.lower() or "triton" in n}
            print(f"{name:6s} {cond:13s} backward kernels {sum(bwd.values()):.3f} ms/call "
                  f"(SM clock now {_clock()})")
            for n, t in sorted(attn.items(), key=lambda kv: -kv[1])[:6]:
                print(f"    {t:8.3f}  {n[:90]}")


if __name__ == "__main__":
    main()
