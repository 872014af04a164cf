"""Greedy generation, sdpa and flex interleaved round by round (same prompts and weights).

Run on a CUDA machine:

    python examples/benchmarks/generate_interleaved.py [rounds] [--json out.json] [--pin CPU]
    python examples/benchmarks/generate_interleaved.py --plot a.json b.json --png out.png

The bench_e2e generation setting (batch 8, 2,048-token prompt, 64 new tokens, bf16, dynamic
cache). Decoding here is bound by host (CPU) time, which varies a lot on a shared machine, so:

- the two implementations alternate, and the order flips every round (sdpa first, then flex
  first), so neither always runs right after the other;
- besides whole calls, every decoding step is timed (host timestamps from a logits processor;
  generate synchronises once per step), and the median over all steps of all rounds is
  reported: a few slow stretches on a noisy machine barely move it;
- "paired" is the median over rounds of (flex - sdpa) for the two calls of one round, for
  whole calls, for the round's median step, and for the calling thread's CPU time
  (``time.thread_time``: time the process was scheduled out does not count, which on a
  shared host removes most of the noise; waits for the GPU count where the CUDA driver
  spins, which is the same for both but for the prompt's GPU work).
"""

import argparse
import json
import statistics
import time

import torch
from transformers import LogitsProcessorList

from hf_flexattn import bench_e2e as be

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("rounds", nargs="?", type=int, default=8)
p.add_argument("--json", help="write every timing here")
p.add_argument("--impls", default="sdpa,flex")
p.add_argument("--plot", nargs="+", metavar="JSON", help="draw saved runs (no timing)")
p.add_argument("--png", default="generate_interleaved.png", help="where --plot draws")
p.add_argument("--pin", type=int, metavar="CPU",
               help="run on this one CPU core only (os.sched_setaffinity), with one torch thread")
args = p.parse_args()
if args.pin is not None:  # fewer migrations and cache refills on a shared host
    import os

    os.sched_setaffinity(0, {args.pin})
    torch.set_num_threads(1)


def _round_medians(run: dict, impl: str) -> list[float]:
    """Median decoding-step time of each round (ms)."""
    steps, rounds = run["step_ms"][impl], run["rounds"]
    n = len(steps) // rounds
    return [statistics.median(steps[r * n : (r + 1) * n]) for r in range(rounds)]


def _plot(files: list[str], png: str) -> None:
    """Per run: each round's median step time, sdpa against flex, and their difference.
    Runs are labelled by the part of the file name before the date (the commit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = []
    for x, f in enumerate(files):
        run = json.load(open(f))
        s, fl = _round_medians(run, "sdpa"), _round_medians(run, "flex")
        labels.append(f.rsplit("_", 2)[-2] if f.count("_") >= 2 else f)
        ax.scatter([x - 0.12] * len(s), s, s=14, color="#999999", label="sdpa" if x == 0 else None)
        ax.scatter([x + 0.12] * len(fl), fl, s=14, color="#4477aa",
                   label="flex (ours)" if x == 0 else None)
        d = [a - b for a, b in zip(fl, s)]
        ax2.scatter([x] * len(d), d, s=14, color="#4477aa")
        ax2.plot([x - 0.25, x + 0.25], [statistics.median(d)] * 2, color="#ee6677", lw=2)
    for a in (ax, ax2):
        a.set_xticks(range(len(files)), labels)
    ax.set_ylabel("median decoding step in a round (ms)")
    ax.set_title("per round: sdpa and flex, interleaved")
    ax.legend()
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_ylabel("flex - sdpa, same round (ms)")
    ax2.set_title("per-round difference (red: median)")
    fig.suptitle("Greedy generate, batch 8, 2,048-token prompt, 64 new tokens (H200)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if args.plot:
    _plot(args.plot, args.png)
    raise SystemExit(0)

spec = be.ModelSpec()
ids, mask = be.make_prompts(8, 2048, spec.vocab)
ids, mask = ids.cuda(), mask.cuda()
impls = args.impls.split(",")
models = {i: be.build_model(spec, i, torch.bfloat16, "cuda", 0, 4096).eval() for i in impls}
stamps: list[float] = []


def stamp(input_ids, scores):
    stamps.append(time.perf_counter())
    return scores


kw = dict(
    attention_mask=mask,
    max_new_tokens=64,
    min_new_tokens=64,
    do_sample=False,
    pad_token_id=be.PAD_ID,
    logits_processor=LogitsProcessorList([stamp]),
)
calls = {i: [] for i in impls}
cpu = {i: [] for i in impls}
prefill = {i: [] for i in impls}
steps = {i: [] for i in impls}
with torch.no_grad():
    for m in models.values():
        m.generate(ids, **kw)  # warm-up
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for i in order:
            m = models[i]
            stamps.clear()
            torch.cuda.synchronize()
            t, c = time.perf_counter(), time.thread_time()
            m.generate(ids, **kw)
            torch.cuda.synchronize()
            calls[i].append((time.perf_counter() - t) * 1e3)
            cpu[i].append((time.thread_time() - c) * 1e3)
            prefill[i].append((stamps[0] - t) * 1e3)  # the prompt's forward, to the 1st token
            steps[i].extend((b - a) * 1e3 for a, b in zip(stamps, stamps[1:]))
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.rounds} rounds")
print(f"{'impl':5s} {'call median ms':>15s} {'min':>8s} {'cpu ms':>8s} {'prefill ms':>11s} "
      f"{'step median ms':>15s}")
for i in impls:
    print(
        f"{i:5s} {statistics.median(calls[i]):15.1f} {min(calls[i]):8.1f} "
        f"{statistics.median(cpu[i]):8.1f} {statistics.median(prefill[i]):11.1f} "
        f"{statistics.median(steps[i]):15.3f}"
    )
    print(f"      all {[round(t) for t in calls[i]]}")
if "flex" in calls and "sdpa" in calls:
    run = {"rounds": args.rounds, "step_ms": steps}
    step_r = {i: _round_medians(run, i) for i in ("flex", "sdpa")}
    for name, a, b, unit in (
        ("call", calls["flex"], calls["sdpa"], "ms"),
        ("thread CPU", cpu["flex"], cpu["sdpa"], "ms"),
        ("round's median step", step_r["flex"], step_r["sdpa"], "ms"),
    ):
        diff = [f - s for f, s in zip(a, b)]
        wins = sum(d < 0 for d in diff)
        print(f"paired flex - sdpa, {name}: median {statistics.median(diff):+.3f} {unit}, "
              f"flex lower in {wins} of {len(diff)} rounds")
if args.json:
    with open(args.json, "w") as f:
        json.dump(
            {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
             "rounds": args.rounds, "pin": args.pin, "call_ms": calls, "cpu_ms": cpu,
             "prefill_ms": prefill, "step_ms": steps},
            f,
        )
