"""Where the prompt's time goes in generation: ours against sdpa, on a CUDA machine.

    python examples/benchmarks/prefill_profile.py [--json out.json] [--no-sweep]

The bench_e2e generation shape: the random-init Llama-style model (``ModelSpec``, bf16) on
8 prompts of 2,048 tokens with an all-ones attention mask, ``use_cache=True`` (the prompt
forward of ``generate``). Per implementation it reports

* ``host_ms``: host time of the forward call (the GPU queue is not drained inside it),
* ``total_ms``: the forward call until the GPU has finished,
* the GPU time of its attention kernels (``torch.profiler``) and the eight kernels with the
  most GPU time;

then the attention kernel alone on the prompt's shape (``[8, 16, 2048, 128]`` queries,
8 kv heads): ours with the integration's BlockMask at the default forward config and at the
configs of :data:`CONFIGS` (and the default tiles with ``kernel_options["tma"]``), against
``scaled_dot_product_attention`` (``is_causal``) on its
flash and cuDNN backends. Medians of CUDA-event timings over 10 back-to-back calls (one
call's host time would otherwise count, see ``_events_ms``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import masking_utils as mu

import hf_flexattn
from hf_flexattn.bench_e2e import ModelSpec, build_model, make_prompts
from hf_flexattn.integrations import transformers as integ

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
CONFIGS = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3),
           (64, 128, 4, 3), (64, 64, 4, 3), (128, 128, 4, 2)]


def _events_ms(fn, n: int = 15, inner: int = 10, queue: bool = True) -> float:
    """GPU time of one call: CUDA events around ``inner`` back-to-back calls, median of
    ``n``. ``queue``: a GPU-side sleep (about 10 ms) runs before the first event, so all
    ``inner`` calls are queued before the GPU reaches them and a call's host time never
    counts, even where it is longer than the kernel (``queue=False``: without it)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queue:
            torch.cuda._sleep(20_000_000)  # cycles
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / inner)
    return statistics.median(out)


def _model_rows(ids: torch.Tensor, mask: torch.Tensor, rounds: int) -> dict:
    rows = {}
    for impl in ("flex", "sdpa"):
        model = build_model(ModelSpec(), impl, torch.bfloat16, ids.device, 0, 4096).eval()

        def fwd(model=model):
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, use_cache=True)

        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
        host, total = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fwd()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            host.append((t1 - t0) * 1e3)
            total.append((t2 - t0) * 1e3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
        kernels: dict[str, float] = {}
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.device_time / 1e3
        top = sorted(kernels.items(), key=lambda kv: -kv[1])
        attn = sum(t for n, t in top if any(s in n.lower() for s in ("flex", "flash", "fmha",
                                                                   "attention", "cudnn")))
        rows[impl] = {
            "host_ms": statistics.median(host),
            "total_ms": statistics.median(total),
            "gpu_ms": sum(kernels.values()),
            "attention_gpu_ms": attn,
            "kernel_count": len(kernels),
            "top": [(n[:90], round(t, 4)) for n, t in top[:8]],
        }
        print(impl, json.dumps(rows[impl], indent=1), flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def _kernel_rows(dev: torch.device, sweep: bool) -> dict:
    B, Hq, Hkv, L, D = 8, 16, 8, 2048, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, Hq, L, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=g)
    am = torch.ones(B, L, device=dev, dtype=torch.long)
    rows = {}
    with torch.no_grad():
        masks = {
            "padding_ones": integ.flex_mask(B, L, L, 0, 0, mu.causal_mask_function, am,
                                            device=dev),
            "no_padding": integ.flex_mask(B, L, L, 0, 0, mu.causal_mask_function, None,
                                          device=dev),
        }
        kr = k.repeat_interleave(Hq // Hkv, 1)
        vr = v.repeat_interleave(Hq // Hkv, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        for be, name in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash"),
                         (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn")):
            try:
                with sdpa_kernel([be]):
                    rows[name] = _events_ms(lambda: torch.nn.functional
                                            .scaled_dot_product_attention(
                                                q, k, v, is_causal=True, enable_gqa=True))
            except RuntimeError as e:
                rows[name] = str(e)[:80]
        cfgs = [None, "tma"] + (CONFIGS if sweep else [])
        names = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
        for (mname, bm), cfg in itertools.product(masks.items(), cfgs):
            if cfg in (None, "tma"):  # the default tiles, with pointer or descriptor loads
                opts = {} if cfg is None else {"tma": True}
                tag = "default" if cfg is None else "default_tma"
            else:
                opts = dict(zip(names, cfg))
                tag = "{}x{}w{}s{}".format(*cfg)
            label = f"ours_{mname}_{tag}"
            try:
                out = hf_flexattn.flex_attention(
                    q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts
                )
                err = float((out.float() - ref.float()).abs().max())
                ms = _events_ms(lambda bm=bm, opts=opts: hf_flexattn.flex_attention(
                    q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts))
                rows[label] = {"ms": ms, "maxdiff": err}
            except Exception as e:  # a config that does not fit: record and go on
                rows[label] = f"{type(e).__name__}: {str(e)[:80]}"
            print(label, rows[label], flush=True)
    flops = 4 * B * Hq * (L * (L + 1) // 2) * D
    for name, r in rows.items():
        ms = r["ms"] if isinstance(r, dict) else r
        if isinstance(ms, float):
            print(f"{name:40s} {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOPs", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-sweep", action="store_true", help="default kernel config only")
    p.add_argument("--no-model", action="store_true", help="kernel rows only")
    args = p.parse_args()
    dev = torch.device("cuda", 0)
    ids, mask = (t.to(dev) for t in make_prompts(8, 2048, ModelSpec().vocab))
    res = {"torch": torch.__version__}
    if not args.no_model:
        res["model"] = _model_rows(ids, mask, args.rounds)
    res["kernel"] = _kernel_rows(dev, not args.no_sweep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
