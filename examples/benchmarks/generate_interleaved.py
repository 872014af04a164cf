"""Greedy generation, sdpa and flex interleaved round by round (same prompts and weights).

Run on a CUDA machine: ``python examples/benchmarks/generate_interleaved.py [rounds]``.
Interleaving spreads host noise over both implementations; decoding here is bound by host
(CPU) time, which varies a lot on a shared machine.
"""

import statistics
import sys
import time

import torch

from hf_flexattn import bench_e2e as be

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
spec = be.ModelSpec()
ids, mask = be.make_prompts(8, 2048, spec.vocab)
ids, mask = ids.cuda(), mask.cuda()
models = {
    i: be.build_model(spec, i, torch.bfloat16, "cuda", 0, 4096).eval() for i in ("sdpa", "flex")
}
kw = dict(
    attention_mask=mask,
    max_new_tokens=64,
    min_new_tokens=64,
    do_sample=False,
    pad_token_id=be.PAD_ID,
)
times = {i: [] for i in models}
with torch.no_grad():
    for m in models.values():
        m.generate(ids, **kw)  # warm-up
    for _ in range(rounds):
        for i, m in models.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            m.generate(ids, **kw)
            torch.cuda.synchronize()
            times[i].append((time.perf_counter() - t) * 1e3)
for i, ts in times.items():
    print(
        f"{i:5s} median {statistics.median(ts):7.1f} ms  min {min(ts):7.1f}  "
        f"all {[round(t) for t in ts]}"
    )
