"""Host time of each part of one decoding call, on a CUDA machine.

    python examples/benchmarks/decode_host_parts.py

The bench_e2e decoding shape (batch 8, 16 query / 8 kv heads of 128, 2,048 cached keys,
bf16). Each part runs in a loop of its own, so these are warm-cache lower bounds; inside
``generate`` every part costs more (the rest of the model runs in between). What matters is
how the parts of our path compare with each other and with sdpa's call. "us" is host time per
call (the GPU queue is not drained inside the loop), the minimum of 5 repeats.
"""

import time

import torch
from hf_flexattn.kernels import flex_decode
from transformers import masking_utils as mu
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_flexattn  # noqa: F401
from hf_flexattn.api import autocast_inputs
from hf_flexattn.backends import triton_backend as tb
from hf_flexattn.integrations import transformers as integ

dev = torch.device("cuda", 0)
B, Hq, Hkv, S, D = 8, 16, 8, 2048, 128
dt = torch.bfloat16
q = torch.randn(B, 1, Hq, D, device=dev, dtype=dt).transpose(1, 2)
k = torch.randn(B, Hkv, S + 64, D, device=dev, dtype=dt)
v = torch.randn(B, Hkv, S + 64, D, device=dev, dtype=dt)
am = torch.ones(B, S + 64, device=dev, dtype=torch.long)
scale = D**-0.5


class Attn(torch.nn.Module):
    is_causal = True
    training = False
    num_key_value_groups = Hq // Hkv


mod = Attn()


def timeit(name: str, fn, n: int = 400) -> None:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t) / n)
        torch.cuda.synchronize()
    print(f"{name:52s} {min(best) * 1e6:8.1f} us  (median {sorted(best)[2] * 1e6:.1f})",
          flush=True)


with torch.no_grad():
    kk, vv = k[:, :, :S].contiguous(), v[:, :, :S].contiguous()
    bm = integ.flex_mask(B, 1, S, S - 1, 0, mu.causal_mask_function, am[:, :S], device=dev)
    integ.flex_attention_forward(mod, q, kk, vv, bm, scaling=scale)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, enable_gqa=True, scale=scale)
    got = integ.flex_attention_forward(mod, q, kk, vv, bm, scaling=scale)[0].transpose(1, 2)
    print("max err vs sdpa", (got.float() - ref.float()).abs().max().item())
    plans = getattr(bm, tb._PLANS_ATTR)
    plan = next(iter(plans.values()))[0]
    pkey = tb._plan_key(q, kk, vv, None, scale, None)
    print("-- a later layer (plan stored on the mask)")
    timeit("integration flex_attention_forward", lambda: integ.flex_attention_forward(
        mod, q, kk, vv, bm, scaling=scale))
    timeit("  triton_backend.run_plan", lambda: tb.run_plan(
        q, kk, vv, None, bm, scale, True, None, False))
    timeit("    DecodePlan.run (allocations + launch)", lambda: plan.run(q, kk, vv, False))
    out = torch.empty_strided(plan.out_shape, plan.out_strides, dtype=dt, device=dev)
    op, lp, cnt, scratch = flex_decode._workspace(dev, *plan.ws)
    timeit("      Bound call (the launch)",
           lambda: plan.split(q, kk, vv, op, lp, out, scratch, cnt))
    timeit("      torch.empty_strided (out)", lambda: torch.empty_strided(
        plan.out_shape, plan.out_strides, dtype=dt, device=dev))
    timeit("      _workspace lookup", lambda: flex_decode._workspace(dev, *plan.ws))
    timeit("    _plan_key", lambda: tb._plan_key(q, kk, vv, None, scale, None))
    timeit("    _direct_call_ok", lambda: tb._direct_call_ok((q, kk, vv)))
    timeit("  autocast_inputs", lambda: autocast_inputs(q, kk, vv))
    timeit("  out.transpose(1, 2).contiguous()", lambda: out.transpose(1, 2).contiguous())
    timeit("transformers sdpa_attention_forward (no mask)", lambda: sdpa_attention_forward(
        mod, q, kk, vv, None, scaling=scale))
    timeit("  torch sdpa direct", lambda: torch.nn.functional.scaled_dot_product_attention(
        q, kk, vv, enable_gqa=True, scale=scale))
    timeit("torch.empty(1)", lambda: torch.empty(1, device=dev))

    print("-- a step's first layer: a new mask (one key more), the plan from the template")
    ks = [(k[:, :, : S + i].contiguous(), v[:, :, : S + i].contiguous()) for i in range(64)]
    masks = []
    step = [0]

    def new_mask():
        i = step[0] = (step[0] + 1) % 64
        n = S + i
        masks.append(integ.flex_mask(
            B, 1, n, n - 1, 0, mu.causal_mask_function, am[:, :n], device=dev))
        if len(masks) > 64:
            masks.pop(0)

    def mask_and_layer0():
        new_mask()
        kn, vn = ks[step[0]]
        integ.flex_attention_forward(mod, q, kn, vn, masks[-1], scaling=scale)

    timeit("flex_mask (decoding step)", new_mask)
    timeit("flex_mask + first layer", mask_and_layer0)

    def mask_and_template():
        new_mask()
        kn, vn = ks[step[0]]
        tb._plan_from_template(q, kn, vn, None, masks[-1], scale, None,
                               tb._plan_key(q, kn, vn, None, scale, None))

    timeit("flex_mask + _plan_from_template (no launch)", mask_and_template)
    del pkey
