"""Per-call CPU cost of each layer of the decode path, against Transformers' sdpa path.

Run on a CUDA machine: ``python examples/benchmarks/decode_overhead.py``. One decoding step of
a Llama-style layer (batch 8, 16 query / 8 kv heads, head dim 128, 2,048 cached tokens, bf16):
the mask build per step, then the attention call at each layer of the stack. "cpu" is the
host time per call with the GPU queue not yet drained; decoding is bound by it.
"""

import time

import torch

import hf_flexattn  # noqa: F401
from hf_flexattn import api
from hf_flexattn.backends import triton_backend as tb
from hf_flexattn.integrations import transformers as integ

dev = torch.device("cuda", 0)
B, Hq, Hkv, S, D = 8, 16, 8, 2048, 128
dt = torch.bfloat16
q = torch.randn(B, 1, Hq, D, device=dev, dtype=dt).transpose(1, 2)
k = torch.randn(B, Hkv, S, D, device=dev, dtype=dt)
v = torch.randn(B, Hkv, S, D, device=dev, dtype=dt)
am = torch.ones(B, S, device=dev, dtype=torch.long)
from transformers import masking_utils as mu  # noqa: E402


class M(torch.nn.Module):
    is_causal = True
    training = False
    num_key_value_groups = Hq // Hkv


mod = M()


def timeit(name, fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    cpu = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
    print(f"{name:45s} cpu {cpu * 1e6:8.1f} us   wall {wall * 1e6:8.1f} us", flush=True)


with torch.no_grad():
    step = [0]

    def mask_step():
        step[0] += 1
        n = S - 64 + (step[0] % 64)
        return integ.flex_mask(
            B, 1, n, n - 1, 0, mu.causal_mask_function, am[:, :n].clone(), device=dev
        )

    timeit("flex_mask (decode step, new kv len)", mask_step, 200)
    bm = integ.flex_mask(B, 1, S, S - 1, 0, mu.causal_mask_function, am, device=dev)
    from hf_flexattn.kernels import _launch

    from hf_flexattn._mod_eval import freeze

    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=D**-0.5)
    got = integ.flex_attention_forward(mod, q, k, v, bm, scaling=D**-0.5)[0].transpose(1, 2)
    print("max err vs sdpa", (got.float() - ref.float()).abs().max().item())
    timeit(
        "backend, mask not frozen",
        lambda: tb.flex_attention_forward(q, k, v, None, bm, D**-0.5, {}),
    )
    freeze(bm.mask_mod)
    timeit(
        "integration.flex_attention_forward",
        lambda: integ.flex_attention_forward(mod, q, k, v, bm, scaling=D**-0.5),
    )
    timeit(
        "api.flex_attention",
        lambda: api.flex_attention(q, k, v, None, bm, scale=D**-0.5, enable_gqa=True),
    )
    timeit(
        "triton_backend.flex_attention_forward",
        lambda: tb.flex_attention_forward(q, k, v, None, bm, D**-0.5, {}),
    )
    timeit(
        "triton_backend.prepare",
        lambda: tb.prepare(
            tuple(q.shape), tuple(v.shape), dt, dev, None, bm.mask_mod, 128, 128, {}
        ),
    )
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    timeit(
        "transformers sdpa_attention_forward (no mask)",
        lambda: sdpa_attention_forward(mod, q, k, v, None, scaling=D**-0.5),
    )
    timeit(
        "torch sdpa direct",
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    )
    timeit("empty op (torch.empty)", lambda: torch.empty(1, device=dev))

print("launcher stats", _launch.stats)
