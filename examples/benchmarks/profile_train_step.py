"""Where the GPU time of one end-to-end training step goes (torch.profiler, CUDA kernels).

Same model, packed row and optimizer as ``hf_flexattn.bench_e2e`` (the training rows);
warms up, profiles ``--steps`` steps and prints the wall time per step, the kernel time per
step, and the kernels grouped into attention (ours or torch's flex, by kernel name), matmuls
and the rest, then the top kernels.

    python examples/benchmarks/profile_train_step.py                 # ours ("flex")
    python examples/benchmarks/profile_train_step.py --impl sdpa --top 25
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from hf_flexattn.bench_e2e import E2EConfig, _make_optimizer, build_model, make_documents

_ATTN = ("flex_fwd", "flex_bwd", "flex_attention", "flash", "fmha", "attention", "triton_tem")
_MATMUL = ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "sgemm")


def _group(name: str) -> str:
    low = name.lower()
    if any(k in low for k in _ATTN):
        return "attention"
    if any(k in low for k in _MATMUL):
        return "matmul"
    return "other"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="flex", help="attn_implementation (flex, sdpa, ...)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    cfg = E2EConfig(device=dev, dtype=torch.bfloat16)
    docs = make_documents(cfg.tokens, cfg.doc_min, cfg.doc_max, cfg.model.vocab, cfg.seed)
    inputs = docs.packed_inputs(cfg.packing, dev)
    model = build_model(cfg.model, args.impl, cfg.dtype, dev, cfg.seed, cfg.max_positions())
    model.train()
    opt = _make_optimizer(cfg, model)

    def step() -> None:
        model(**inputs, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps * 1e3
    kernels: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name] += ev.device_time / 1e3 / args.steps  # ms per step
            counts[ev.name] += 1
    groups: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        groups[_group(name)] += ms
    total = sum(kernels.values())
    print(f"impl {args.impl}: wall {wall:.1f} ms/step (under the profiler), "
          f"kernels {total:.1f} ms/step")
    for g in ("attention", "matmul", "other"):
        print(f"  {g:<10} {groups[g]:8.2f} ms  {100 * groups[g] / max(total, 1e-9):5.1f} %")
    print(f"top {args.top} kernels (ms per step, launches per step):")
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {ms:8.3f}  {counts[name] // args.steps:4d}  {_group(name):<9}  {name[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
