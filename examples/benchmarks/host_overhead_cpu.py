"""Host (Python) time of greedy generation, ours against sdpa, on a CPU with the kernels stubbed.

Token-by-token generation of a small model is bound by host time: the GPU finishes each
kernel before the host has launched the next. This script measures that host time without a
GPU. It runs ``generate`` on a tiny Llama-style model (8 layers, 16 query / 8 kv heads) with
``attn_implementation="flex"`` (our Triton backend, kernel launches replaced by no-ops) and
``"sdpa"`` (``scaled_dot_product_attention`` replaced by an allocation of its output), so
everything else the two runs do is the same work. It prints the time per decoding step and,
inside that, the time of the mask function and of the attention calls.

    python examples/benchmarks/host_overhead_cpu.py [--rounds 7] [--new 64] [--prompt 300]
        [--json runs.json --label NAME]      # keep the medians
    python examples/benchmarks/host_overhead_cpu.py --plot runs.json --png out.png

Numbers are host times on this machine; the ratio between the two is what carries over to a
GPU host (a real launch adds a few microseconds to both). The model's other layers run
between attention calls, as in real decoding, so Python's caches are as cold as they are
there; a loop over one attention call alone reads lower.

``--device cuda`` runs the same comparison on a GPU with the real kernels and the end-to-end
benchmark's model (``hf_flexattn.bench_e2e.ModelSpec``, bf16, ``--prompt 2048`` there): the
breakdown of where the host time of a real decoding step goes. "step (per-step median)" is
the median over every decoding step of every round (timestamps from a logits processor), which
a few slow steps on a noisy machine do not move.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

_CUDA = "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1 :][:1] == ["cuda"]
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_FLEXATTN_BACKEND"] = "triton"

import torch  # noqa: E402
import transformers.integrations.sdpa_attention as sdpa_mod  # noqa: E402
from hf_flexattn.kernels import _launch  # noqa: E402
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import hf_flexattn  # noqa: E402,F401


def _stub_kernels() -> None:
    _launch.Launcher._triton = lambda self, grid, args, cx: None

    class _F:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def scaled_dot_product_attention(q, k, v, *args, **kwargs):
            return torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)

    class _NN:
        functional = _F()

        def __getattr__(self, name):
            return getattr(torch.nn, name)

    class _Torch:
        nn = _NN()

        def __getattr__(self, name):
            return getattr(torch, name)

    sdpa_mod.torch = _Torch()


@contextlib.contextmanager
def _count_syncs(cuda: bool):
    """Collect one entry per host-device synchronisation (CUDA's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        found: list = []
        try:
            yield found
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        found.extend(w for w in caught if "synchroniz" in str(w.message))


_ACC: dict[str, float] = {}
_CALLS: list[tuple[int, int, float]] = []


def _timed(mapping: dict, name: str, label: str, per_call: bool) -> None:
    fn = mapping[name]

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        dt = time.perf_counter() - t
        _ACC[label] = _ACC.get(label, 0.0) + dt
        if per_call:
            q = args[1]
            _CALLS.append((getattr(args[0], "layer_idx", -1), q.shape[2], dt))
        return out

    mapping[name] = wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new", type=int, default=64, help="new tokens per generate call")
    p.add_argument("--prompt", type=int, default=300, help="prompt length")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--impls", default="flex,sdpa")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: real kernels, the e2e benchmark's model in bf16")
    p.add_argument("--json", help="append this run's medians (with --label) to a JSON file")
    p.add_argument("--label", default="", help="name of this run in --json")
    p.add_argument("--decode-min-s", type=int, metavar="S",
                   help="use the decode kernel from S keys on (default: the backend's)")
    p.add_argument("--no-fwd-plans", action="store_true",
                   help="store no forward plans (a prompt's later layers prepare again)")
    p.add_argument("--profile-prompt", action="store_true",
                   help="after the timings, cProfile one prompt call per impl (our functions)")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="draw saved runs (no timing)")
    p.add_argument("--png", default="host_overhead_cpu.png", help="where --plot draws")
    args = p.parse_args()
    if args.plot:
        _plot(args.plot, args.png)
        return
    impls = args.impls.split(",")
    cuda = args.device == "cuda"
    from hf_flexattn.backends import triton_backend

    if args.decode_min_s is not None:
        triton_backend.DECODE_MIN_S = args.decode_min_s
    if args.no_fwd_plans:
        triton_backend._FWD_PLANS = False
    if not cuda:
        torch.set_num_threads(1)
        # the stubbed kernels leave their outputs uninitialised; denormal garbage would make
        # the rest of the model slower in one run than in the other
        torch.set_flush_denormal(True)
        _stub_kernels()
    for name in impls:
        _timed(AttentionInterface._global_mapping, name, "attention", True)
        _timed(AttentionMaskInterface._global_mapping, name, "mask", False)
    B, N = args.batch, args.new
    if cuda:
        from hf_flexattn import bench_e2e as be

        spec = be.ModelSpec()
        models = {
            i: be.build_model(spec, i, torch.bfloat16, "cuda", 0, 4096).eval() for i in impls
        }
        ids = torch.randint(3, spec.vocab, (B, args.prompt), device="cuda")
    else:
        cfg = AutoConfig.for_model(
            "llama", vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=8, head_dim=8,
            max_position_embeddings=4096,
        )
        torch.manual_seed(0)
        models = {
            i: AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=i).eval()
            for i in impls
        }
        ids = torch.randint(1, 32, (B, args.prompt))
    am = torch.ones(B, args.prompt, dtype=torch.long, device=ids.device)
    stamps: list[float] = []

    def stamp(input_ids, scores):
        stamps.append(time.perf_counter())
        return scores

    from transformers import LogitsProcessorList

    kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0,
              logits_processor=LogitsProcessorList([stamp]))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    per_step = {i: [] for i in impls}
    steps = {i: [] for i in impls}
    parts = {i: {"mask": [], "attention": []} for i in impls}
    layers = {i: {} for i in impls}
    prompt = {i: {k: [] for k in ("first", "mask", "attention", "syncs", "layer0", "layers1")}
              for i in impls}
    with torch.no_grad():
        for m in models.values():
            m.generate(ids, attention_mask=am, **kw)
        for _ in range(args.rounds):
            for i, m in models.items():  # interleaved
                # the prompt alone, then the whole call: the difference is the decoding steps
                _ACC.clear()
                _CALLS.clear()
                stamps.clear()
                sync()
                with _count_syncs(cuda) as syncs:
                    t = time.perf_counter()
                    m.generate(
                        ids, attention_mask=am, **dict(kw, max_new_tokens=1, min_new_tokens=1)
                    )
                    first = stamps[0] - t  # host time to the first token, the GPU not waited
                    sync()
                pre, pre_acc = time.perf_counter() - t, dict(_ACC)
                prompt[i]["first"].append(first)
                prompt[i]["mask"].append(pre_acc.get("mask", 0.0))
                prompt[i]["attention"].append(pre_acc.get("attention", 0.0))
                prompt[i]["syncs"].append(len(syncs))
                for layer, _lq, dt in _CALLS:
                    prompt[i]["layer0" if layer == 0 else "layers1"].append(dt)
                _ACC.clear()
                _CALLS.clear()
                stamps.clear()
                sync()
                t = time.perf_counter()
                m.generate(ids, attention_mask=am, **kw)
                sync()
                total = time.perf_counter() - t
                per_step[i].extend(b - a for a, b in zip(stamps, stamps[1:]))
                steps[i].append((total - pre) / (N - 1))
                for k in ("mask", "attention"):
                    parts[i][k].append((_ACC.get(k, 0.0) - pre_acc.get(k, 0.0)) / (N - 1))
                for layer, lq, dt in _CALLS:
                    if lq == 1:
                        layers[i].setdefault(layer, []).append(dt)
    us = 1e6
    rows = {}
    for i in impls:
        rest = [t for layer, ts in layers[i].items() if layer > 0 for t in ts]
        rows[i] = {
            "step_us": statistics.median(steps[i]) * us,
            "step_median_us": statistics.median(per_step[i]) * us,
            "mask_us": statistics.median(parts[i]["mask"]) * us,
            "attention_us": statistics.median(parts[i]["attention"]) * us,
            "layer0_us": statistics.median(layers[i].get(0, [0.0])) * us,
            "layers1_us": (statistics.median(rest) if rest else 0.0) * us,
        }
        pr = prompt[i]
        rows[i].update({
            "prompt_first_us": statistics.median(pr["first"]) * us,
            "prompt_mask_us": statistics.median(pr["mask"]) * us,
            "prompt_attention_us": statistics.median(pr["attention"]) * us,
            "prompt_layer0_us": statistics.median(pr["layer0"] or [0.0]) * us,
            "prompt_layers1_us": statistics.median(pr["layers1"] or [0.0]) * us,
            "prompt_syncs": statistics.median(pr["syncs"]),
        })
    if args.json:
        runs = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else []
        runs.append({"label": args.label, "rounds": args.rounds, "batch": B,
                     "prompt": args.prompt, "new": N, "torch": torch.__version__, "rows": rows})
        Path(args.json).write_text(json.dumps(runs, indent=1))
    print(f"host time per decoding step (median of {args.rounds} rounds, batch {B}, "
          f"{args.prompt}-token prompt, {N} new tokens, torch {torch.__version__}, "
          f"{args.device})")
    print(f"{'impl':6s} {'step us':>9s} {'per-step median':>16s} {'mask us':>9s} "
          f"{'attention us':>13s} {'layer 0 us':>11s} {'layers 1+ us':>13s}")
    for i, r in rows.items():
        print(f"{i:6s} {r['step_us']:9.0f} {r['step_median_us']:16.0f} {r['mask_us']:9.1f} "
              f"{r['attention_us']:13.1f} {r['layer0_us']:11.1f} {r['layers1_us']:13.1f}")
    if args.profile_prompt:
        import cProfile
        import pstats

        for i, m in models.items():
            pr = cProfile.Profile()
            with torch.no_grad():
                sync()
                pr.enable()
                m.generate(ids, attention_mask=am, **dict(kw, max_new_tokens=1, min_new_tokens=1))
                pr.disable()
                sync()
            print(f"== cProfile of one prompt call, {i}")
            pstats.Stats(pr).sort_stats("cumtime").print_stats("hf_flexattn|kernels/|masking", 30)
    print("the prompt (generate with one new token): host time to the first token, without "
          "waiting for the GPU; host syncs counted on CUDA")
    print(f"{'impl':6s} {'to 1st token us':>16s} {'mask us':>9s} {'attention us':>13s} "
          f"{'layer 0 us':>11s} {'layers 1+ us':>13s} {'syncs':>6s}")
    for i, r in rows.items():
        print(f"{i:6s} {r['prompt_first_us']:16.0f} {r['prompt_mask_us']:9.1f} "
              f"{r['prompt_attention_us']:13.1f} {r['prompt_layer0_us']:11.1f} "
              f"{r['prompt_layers1_us']:13.1f} {r['prompt_syncs']:6.0f}")


def _plot(files: list[str], png: str) -> None:
    """Stacked bars per run and implementation: mask, attention, everything else."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for f in files for r in json.loads(Path(f).read_text())]
    names, mask, attn, other = [], [], [], []
    for run in runs:
        for impl, r in run["rows"].items():
            names.append(f"{run['label']}\n{impl}" if run["label"] else impl)
            mask.append(r["mask_us"])
            attn.append(r["attention_us"])
            other.append(r["step_us"] - r["mask_us"] - r["attention_us"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(2.6 * len(names) + 2, 4))
    x = list(range(len(names)))
    top = [a + b for a, b in zip(other, attn)]
    ax.bar(x, other, label="rest of the step", color="#bbbbbb")
    ax.bar(x, attn, bottom=other, label="attention calls (8 layers)", color="#4477aa")
    ax.bar(x, mask, bottom=top, label="mask function", color="#ee6677")
    ax.set_title("whole decoding step")
    ax2.bar(x, attn, color="#4477aa")
    ax2.bar(x, mask, bottom=attn, color="#ee6677")
    ax2.set_title("attention calls + mask function")
    for a in (ax, ax2):
        a.set_xticks(x, names, fontsize=8)
        a.set_ylabel("host time per decoding step (us)")
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Decoding host time with the kernels stubbed (CPU proxy)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
