"""``hf-flexattn bench-e2e``: whole-model training steps and greedy generation, in one run.

A random-init Llama-style model (default: hidden 2048, 8 layers, 16 query / 8 kv heads of
dim 128, MLP 5632, vocab 32000, bf16) is built once per attention implementation from the
same seed, so every implementation starts from identical weights.

**Training** (forward + backward + optimizer step, ``use_cache=False``) on one packed row of
``--tokens`` (16,384) tokens made of random-length documents (lengths uniform in
``--doc-min..--doc-max``, fixed seed, the last one cut to fill the row). The row is built
by ``transformers.DataCollatorWithFlattening``: labels ``-100`` at each document start,
``position_ids`` restarting at 0 and, with ``--packing flash_kwargs`` (default), also
``cu_seq_lens_q/k`` and ``max_length_q/k``. Rows of the table:

* ``flex``: ours (``attn_implementation="flex"``), packed row;
* ``flex_attention``: Transformers' built-in (torch's compiled FlexAttention), packed row;
* ``sdpa_packed``: ``"sdpa"`` on the same packed row with the same kwargs (the ``mask``
  column says what Transformers gave SDPA for it: ``causal`` when it ignores the documents,
  a dense 4-D mask when it finds them in ``position_ids``, as Transformers 5.x does);
* ``sdpa_causal``: ``"sdpa"`` on the packed row given only ``input_ids`` and ``labels``: plain
  causal attention over the whole row, documents ignored (SDPA's flash path; this is how the
  earlier "SDPA packed row" reference was taken), so its per-document losses differ;
* ``sdpa_padded``: ``"sdpa"`` on the same documents as a right-padded batch
  (``B = number of documents``, ``attention_mask`` for the padding).

For each: the first step (includes compilation), the median over ``--steps`` steps after
``--warmup`` more, tokens/s (real tokens), peak memory of the timed steps, the loss of the
first step (initial weights) and, per document, its mean next-token loss, compared with
``sdpa_padded`` (which sees each document alone) to show that packing is honoured.

**Generation**: ``model.generate(input_ids, attention_mask, max_new_tokens=N,
min_new_tokens=N, do_sample=False)`` for a batch of ``--batch`` random prompts of
``--prompt`` tokens, per cache implementation in ``--cache`` (``dynamic``; optionally
``static``). First call, then the median of ``--gen-repeats`` calls; the new tokens are
compared with ``sdpa``'s (fraction equal, whether the first 8 agree in every row, and the
first diverging step per row: random-init bf16 models can flip a near-tie).

Timing is ``torch.cuda.synchronize`` + ``time.perf_counter`` around each call. Outputs in
``--out``: ``e2e.json`` (rewritten after every implementation, so an interrupted run keeps
what it measured), ``e2e.png`` (bars, when matplotlib is available) and a printed table.
``--quick`` is a CPU smoke run of a tiny model in fp32 that also checks packed-vs-separate
per-document losses and greedy tokens of ``flex`` against ``sdpa`` (exit status 1 if not).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hf_flexattn.bench import resolve_device

logger = logging.getLogger(__name__)

__all__ = [
    "Documents",
    "E2EConfig",
    "ModelSpec",
    "build_model",
    "format_table",
    "main",
    "make_documents",
    "make_prompts",
    "per_document_losses",
    "run_benchmark",
]

TRAIN_IMPLS = ("flex", "flex_attention", "sdpa_packed", "sdpa_causal", "sdpa_padded")
GEN_IMPLS = ("flex", "flex_attention", "sdpa")
IMPL_CHOICES = ("flex", "flex_attention", "sdpa", "sdpa_packed", "sdpa_causal", "sdpa_padded")
CACHES = ("dynamic", "static")
PACKINGS = ("flash_kwargs", "position_ids")
PAD_ID = 0
#: tolerances of the --quick checks (fp32): per-document loss, absolute
QUICK_LOSS_TOL = 1e-4

#: Earlier measurements on the H100 of the device machine (transformers 5.17, default
#: shapes), shown next to ours when the run uses the default shapes on CUDA.
REFERENCE_MS = {
    "train": {"flex_attention": 141.6, "sdpa_causal": 334.0, "sdpa_padded": 271.0},
    "train_first_s": {"flex_attention": 71.0},
    "generate": {"sdpa": 772.0, "flex_attention": 1604.0},
    "generate_first_s": {"flex_attention": 20.0},
}


# --------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Shape of the Llama-style model (``LlamaConfig`` fields)."""

    hidden: int = 2048
    layers: int = 8
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 5632
    vocab: int = 32000


QUICK_MODEL = ModelSpec(
    hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256
)


def build_model(
    spec: ModelSpec,
    attn_implementation: str,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    max_positions: int = 4096,
) -> torch.nn.Module:
    """A random-init ``LlamaForCausalLM`` with ``attn_implementation``, weights drawn on
    ``device`` after ``torch.manual_seed(seed)`` (identical for every implementation).
    Attention dropout is 0; ``pad_token_id`` is :data:`PAD_ID`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_flexattn  # noqa: F401 - registers "flex"

    if spec.heads % spec.kv_heads:
        raise ValueError(
            f"spec.heads must be a multiple of spec.kv_heads, got {spec.heads} and {spec.kv_heads}."
        )
    cfg = LlamaConfig(
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.intermediate,
        vocab_size=spec.vocab,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn_implementation, dtype=dtype
        )
    if any(p.device != torch.device(device) for p in model.parameters()):
        model.to(device)  # a Transformers version that built the weights elsewhere
    model.generation_config.pad_token_id = PAD_ID
    return model


@dataclass
class Documents:
    """Documents of one packed row: ``ids`` ``[T]`` int64 (CPU), ``lengths`` summing to T."""

    ids: torch.Tensor
    lengths: list[int]

    @property
    def offsets(self) -> list[int]:
        """Start of each document in the packed row, plus ``T`` at the end."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return out

    def packed_inputs(self, packing: str, device: torch.device | str) -> dict[str, Any]:
        """Batch-1 kwargs as ``DataCollatorWithFlattening`` builds them: ``input_ids``,
        ``labels`` (``-100`` at each document start), ``position_ids`` restarting at 0 and,
        for ``packing="flash_kwargs"``, ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k``."""
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}.")
        from transformers import DataCollatorWithFlattening

        collator = DataCollatorWithFlattening(
            return_flash_attn_kwargs=packing == "flash_kwargs", return_position_ids=True
        )
        o = self.offsets
        feats = [{"input_ids": self.ids[o[i] : o[i + 1]].tolist()} for i in range(len(o) - 1)]
        batch = collator(feats, return_tensors="pt")
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def padded_inputs(self, device: torch.device | str) -> dict[str, Any]:
        """One document per row, right-padded to the longest: ``input_ids [n, Lmax]``,
        ``attention_mask`` (1 on tokens), ``labels`` (``-100`` on padding)."""
        n, lmax = len(self.lengths), max(self.lengths)
        ids = torch.full((n, lmax), PAD_ID, dtype=torch.long)
        mask = torch.zeros((n, lmax), dtype=torch.long)
        o = self.offsets
        for i, length in enumerate(self.lengths):
            ids[i, :length] = self.ids[o[i] : o[i + 1]]
            mask[i, :length] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "labels": labels.to(device),
        }


def make_documents(total: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> Documents:
    """Random documents filling exactly ``total`` tokens.

    Lengths are drawn uniformly from ``min_len..max_len`` until the row is full; the last
    one is cut to fit (and merged into the previous one if fewer than 2 tokens remain, so
    every document has a next-token target). Token ids are uniform in ``3..vocab-1``.
    """
    for name, val in (("total", total), ("min_len", min_len), ("max_len", max_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 2:
            raise ValueError(f"{name} must be an int >= 2, got {val!r}.")
    if max_len < min_len:
        raise ValueError(f"max_len must be >= min_len ({min_len}), got {max_len}.")
    if not isinstance(vocab, int) or vocab < 4:
        raise ValueError(f"vocab must be an int >= 4, got {vocab!r}.")
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    left = total
    while left > 0:
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        n = min(n, left)
        if n < 2 and lengths:
            lengths[-1] += n
        else:
            lengths.append(n)
        left -= n
    ids = torch.randint(3, vocab, (total,), generator=g)
    return Documents(ids=ids, lengths=lengths)


def make_prompts(
    batch: int, prompt: int, vocab: int, seed: int = 1, left_pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts ``input_ids [batch, prompt]`` and ``attention_mask``; every odd row
    has ``left_pad`` padding tokens on the left (``PAD_ID``, mask 0)."""
    if not 0 <= left_pad < prompt:
        raise ValueError(f"left_pad must be in [0, prompt={prompt}), got {left_pad}.")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[1::2, :left_pad] = PAD_ID
        mask[1::2, :left_pad] = 0
    return ids, mask


def per_document_losses(
    logits: torch.Tensor, labels: torch.Tensor, docs: Documents, layout: str
) -> list[float]:
    """Mean next-token cross-entropy of each document (fp32, fp64 for fp64 logits).

    ``layout="packed"``: ``logits [1, T, V]`` of the packed row; ``"padded"``: ``logits
    [n, Lmax, V]`` with one document per row. ``labels`` are the model's labels in the same
    layout (targets are ``labels[t + 1]``; ``-100`` ignored).
    """
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}.")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    F = torch.nn.functional
    out = []
    o = docs.offsets
    for i, length in enumerate(docs.lengths):
        if layout == "packed":
            lg, lb = logits[0, o[i] : o[i + 1] - 1], labels[0, o[i] + 1 : o[i + 1]]
        else:
            lg, lb = logits[i, : length - 1], labels[i, 1:length]
        out.append(float(F.cross_entropy(lg.detach().to(acc), lb, ignore_index=-100)))
    return out


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class E2EConfig:
    """Everything one run needs (see ``--help`` for the meaning of each field)."""

    device: torch.device
    dtype: torch.dtype
    model: ModelSpec = field(default_factory=ModelSpec)
    impls: list[str] = field(default_factory=lambda: list(IMPL_CHOICES[:3]))
    train: bool = True
    generate: bool = True
    tokens: int = 16384
    doc_min: int = 256
    doc_max: int = 4096
    packing: str = "flash_kwargs"
    optimizer: str = "adamw"
    lr: float = 1e-5
    steps: int = 10
    warmup: int = 2
    batch: int = 8
    prompt: int = 2048
    new_tokens: int = 64
    left_pad: int = 0
    gen_repeats: int = 3
    caches: list[str] = field(default_factory=lambda: ["dynamic"])
    seed: int = 0
    out: str = "bench_e2e_out"
    our_backend: str | None = None
    time_budget: float | None = None
    quick: bool = False

    def train_impls(self) -> list[str]:
        """Training rows in run order (references first, the built-in compile last)."""
        want = set(self.impls)
        if "sdpa" in want:
            want |= {"sdpa_packed", "sdpa_causal", "sdpa_padded"}
        order = ("sdpa_padded", "sdpa_packed", "sdpa_causal", "flex", "flex_attention")
        return [i for i in order if i in want]

    def gen_impls(self) -> list[str]:
        """Generation rows in run order (``sdpa`` first: it is the token reference)."""
        want = {("sdpa" if i.startswith("sdpa") else i) for i in self.impls}
        return [i for i in ("sdpa", "flex", "flex_attention") if i in want]

    def is_default_shape(self) -> bool:
        """Whether the reference numbers of :data:`REFERENCE_MS` apply."""
        d = E2EConfig(device=self.device, dtype=torch.bfloat16)
        same = ("model", "tokens", "doc_min", "doc_max", "batch", "prompt", "new_tokens")
        return (
            self.device.type == "cuda"
            and self.dtype == torch.bfloat16
            and self.left_pad == 0
            and all(getattr(self, k) == getattr(d, k) for k in same)
        )

    def max_positions(self) -> int:
        need = max(self.tokens, self.doc_max, self.prompt + self.new_tokens)
        return 1 << max(10, math.ceil(math.log2(need)))


# --------------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------------
def _attn_of(impl: str) -> str:
    return "sdpa" if impl.startswith("sdpa") else impl


def _sdpa_mask_kind(model: torch.nn.Module, inputs: dict[str, Any]) -> str:
    """What Transformers hands SDPA for these packed inputs: ``causal`` (mask skipped: the
    documents are ignored) or a description of the mask it builds."""
    try:
        import inspect

        from transformers.masking_utils import create_causal_mask

        ids = inputs["input_ids"]
        names = inspect.signature(create_causal_mask).parameters
        kw: dict[str, Any] = {
            "config": model.config,
            "attention_mask": inputs.get("attention_mask"),
            "position_ids": inputs.get("position_ids"),
        }
        embeds = torch.empty(*ids.shape, 1, device=ids.device, dtype=model.dtype)
        kw["inputs_embeds" if "inputs_embeds" in names else "input_embeds"] = embeds
        for name in ("cache", "past_key_values"):  # the argument's name changed across 5.x
            if name in names:
                kw[name] = None
                break
        if "cache_position" in names:
            kw["cache_position"] = torch.arange(ids.shape[1], device=ids.device)
        mask = create_causal_mask(**kw)
    except Exception as e:  # noqa: BLE001 - informative only
        return f"unknown ({_err(e)})"
    if mask is None:
        return "causal"
    if isinstance(mask, torch.Tensor):
        kind = "dense 4-D " + str(mask.dtype).replace("torch.", "")
        del mask
        return kind
    return type(mask).__name__


def _make_optimizer(cfg: E2EConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr)


def _guarded(
    kind: str, body: Callable[[dict[str, Any]], None], row: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Run ``body(row)``; an exception is recorded in ``row`` (one failure must not end the
    run). Memory is freed afterwards either way (the body's locals are gone by then)."""
    try:
        body(row)
    except Exception as e:  # noqa: BLE001 - one failure must not end the run
        row["error"] = _err(e)
        row["traceback"] = traceback.format_exc(limit=12)
        logger.warning("%s %s failed: %s", kind, row["impl"], row["error"])
    _free(device)
    return row


def run_train(impl: str, cfg: E2EConfig, docs: Documents) -> dict[str, Any]:
    """One training row (see the module docstring); never raises, errors go in ``error``."""
    row: dict[str, Any] = {"impl": impl, "attn_implementation": _attn_of(impl)}
    return _guarded("train", lambda r: _train_row(impl, cfg, docs, r), row, cfg.device)


def _train_row(impl: str, cfg: E2EConfig, docs: Documents, row: dict[str, Any]) -> None:
    dev = cfg.device
    padded = impl == "sdpa_padded"
    inputs = docs.padded_inputs(dev) if padded else docs.packed_inputs(cfg.packing, dev)
    if impl == "sdpa_causal":
        inputs = {k: inputs[k] for k in ("input_ids", "labels")}
    row["input"] = (
        f"padded {tuple(inputs['input_ids'].shape)}"
        if padded
        else f"packed (1, {docs.ids.numel()}), {len(docs.lengths)} docs, "
        + ("input_ids only" if impl == "sdpa_causal" else cfg.packing)
    )
    _reset_peak(dev)
    model = build_model(cfg.model, _attn_of(impl), cfg.dtype, dev, cfg.seed, cfg.max_positions())
    model.train()
    if impl == "sdpa_packed":
        row["mask"] = _sdpa_mask_kind(model, inputs)
    elif impl == "sdpa_padded":
        row["mask"] = "padding + causal"
    elif impl == "sdpa_causal":
        row["mask"] = "causal (docs ignored)"
    else:
        row["mask"] = "documents (block mask)"
    opt = _make_optimizer(cfg, model)
    keep: dict[str, torch.Tensor] = {}

    def step(first: bool = False) -> torch.Tensor:
        out = model(**inputs, use_cache=False)
        out.loss.backward()
        if first:  # the logits of the initial weights, for the per-document losses
            keep["logits"] = out.logits.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    t_first, loss0 = _wall(lambda: step(True), dev)
    row["first_step_s"] = t_first
    row["loss0"] = float(loss0)
    row["doc_losses"] = per_document_losses(
        keep.pop("logits"), inputs["labels"], docs, "padded" if padded else "packed"
    )
    for _ in range(cfg.warmup):
        step()
    _free(dev)
    _reset_peak(dev)
    times = [_wall(step, dev)[0] for _ in range(cfg.steps)]
    row["peak_gib"] = _peak_gib(dev)
    row["step_ms"] = [t * 1e3 for t in times]
    row["median_ms"] = statistics.median(times) * 1e3
    row["min_ms"] = min(times) * 1e3
    row["tokens_per_s"] = docs.ids.numel() / statistics.median(times)


def run_generate(
    impl: str, cfg: E2EConfig, cache: str, prompts: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """One generation row; never raises, errors go in ``error``."""
    row: dict[str, Any] = {"impl": impl, "cache": cache}
    return _guarded(
        "generate", lambda r: _generate_row(impl, cfg, cache, prompts, r), row, cfg.device
    )


def _generate_row(
    impl: str,
    cfg: E2EConfig,
    cache: str,
    prompts: tuple[torch.Tensor, torch.Tensor],
    row: dict[str, Any],
) -> None:
    dev = cfg.device
    ids, mask = (t.to(dev) for t in prompts)
    _reset_peak(dev)
    model = build_model(cfg.model, impl, cfg.dtype, dev, cfg.seed, cfg.max_positions())
    model.eval()
    kw: dict[str, Any] = dict(
        attention_mask=mask,
        max_new_tokens=cfg.new_tokens,
        min_new_tokens=cfg.new_tokens,
        do_sample=False,
        pad_token_id=PAD_ID,
    )
    if cache != "dynamic":
        kw["cache_implementation"] = cache

    def call() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, **kw)

    t_first, out = _wall(call, dev)
    row["first_call_s"] = t_first
    times = []
    for _ in range(cfg.gen_repeats):
        t, again = _wall(call, dev)
        times.append(t)
        if not torch.equal(again, out):
            row["nondeterministic"] = True
    row["peak_gib"] = _peak_gib(dev)
    new = out[:, ids.shape[1] :].cpu()
    row["tokens"] = new.tolist()
    if times:
        row["call_ms"] = [t * 1e3 for t in times]
        row["median_ms"] = statistics.median(times) * 1e3
        row["new_tokens_per_s"] = new.numel() / statistics.median(times)


def compare_tokens(tokens: list[list[int]], ref: list[list[int]], first: int = 8) -> dict:
    """Agreement of greedy tokens ``[B, N]`` with a reference: fraction equal, whether the
    first ``first`` tokens agree in every row, and the first differing step per row (-1 if
    none)."""
    a, b = torch.tensor(tokens), torch.tensor(ref)
    if a.shape != b.shape:
        raise ValueError(
            f"tokens must have the reference's shape {tuple(b.shape)}, got {tuple(a.shape)}."
        )
    eq = a == b
    diverge = [int(r.logical_not().nonzero()[0]) if not bool(r.all()) else -1 for r in eq]
    return {
        "frac_equal": int(eq.sum()) / eq.numel(),
        f"first_{first}_equal": bool(eq[:, :first].all()),
        "first_divergence": diverge,
    }


def _checks(res: dict[str, Any], quick: bool) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    train = {r["impl"]: r for r in res["train"] if "doc_losses" in r}
    ref = train.get("sdpa_padded")
    if ref is not None:
        for impl, r in train.items():
            if impl == "sdpa_padded":
                continue
            diff = max(abs(x - y) for x, y in zip(r["doc_losses"], ref["doc_losses"]))
            checks[f"train/{impl}/doc_loss_max_abs_diff_vs_sdpa_padded"] = diff
            checks[f"train/{impl}/loss0_abs_diff_vs_sdpa_padded"] = abs(r["loss0"] - ref["loss0"])
    for r in res["generate"]:
        if r["impl"] == "sdpa" or "tokens" not in r:
            continue
        ref_row = next(
            (
                x
                for x in res["generate"]
                if x["impl"] == "sdpa" and x["cache"] == r["cache"] and "tokens" in x
            ),
            None,
        )
        if ref_row is not None:
            cmp = compare_tokens(r["tokens"], ref_row["tokens"])
            r["vs_sdpa"] = cmp
            checks[f"generate/{r['impl']}/{r['cache']}/frac_equal_vs_sdpa"] = cmp["frac_equal"]
            checks[f"generate/{r['impl']}/{r['cache']}/first_8_equal_vs_sdpa"] = cmp[
                "first_8_equal"
            ]
    if quick:
        ok = True
        flex = train.get("flex")
        if res["config"]["train"]:
            d = checks.get("train/flex/doc_loss_max_abs_diff_vs_sdpa_padded")
            ok &= d is not None and d <= QUICK_LOSS_TOL and flex is not None
        if res["config"]["generate"]:
            fr = [
                v
                for k, v in checks.items()
                if k.startswith("generate/flex/") and k.endswith("frac_equal_vs_sdpa")
            ]
            ok &= bool(fr) and all(v == 1.0 for v in fr)
        checks["quick_passed"] = bool(ok)
    return checks


def _versions() -> dict[str, Any]:
    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "accelerate", "hf_flexattn"):
        try:
            v[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - report what is missing
            v[name] = None
    return v


def _header(cfg: E2EConfig, argv: Sequence[str]) -> dict[str, Any]:
    dev = cfg.device
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
    else:
        gpu = f"CPU ({platform.processor() or platform.machine()})"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu,
        "versions": _versions(),
        "command": "hf-flexattn bench-e2e " + shlex.join(list(argv)),
        "timer": "torch.cuda.synchronize + time.perf_counter per call"
        if dev.type == "cuda"
        else "time.perf_counter per call",
    }


def _config_dict(cfg: E2EConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["device"] = str(cfg.device)
    d["dtype"] = str(cfg.dtype).replace("torch.", "")
    return d


def _warm_device(dev: torch.device, dtype: torch.dtype) -> None:
    """Create the CUDA context and cuBLAS handles before the first timed row."""
    if dev.type != "cuda":
        return
    a = torch.randn(256, 256, device=dev, dtype=dtype, requires_grad=True)
    (a @ a).sum().backward()
    _sync(dev)


def run_benchmark(cfg: E2EConfig, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Run every selected row; returns the results dict (also written to ``cfg.out``)."""
    import hf_flexattn  # noqa: F401 - registers "flex"

    if cfg.our_backend is not None:
        os.environ["HF_FLEXATTN_BACKEND"] = cfg.our_backend
    res: dict[str, Any] = {
        "header": _header(cfg, argv),
        "config": _config_dict(cfg),
        "train": [],
        "generate": [],
        "checks": {},
    }
    if cfg.is_default_shape():
        res["reference_ms"] = REFERENCE_MS
    t_start = time.perf_counter()

    def over_budget() -> bool:
        return cfg.time_budget is not None and time.perf_counter() - t_start > cfg.time_budget

    _warm_device(cfg.device, cfg.dtype)
    if cfg.train:
        docs = make_documents(cfg.tokens, cfg.doc_min, cfg.doc_max, cfg.model.vocab, cfg.seed)
        res["documents"] = {"lengths": docs.lengths, "n_docs": len(docs.lengths)}
        for impl in cfg.train_impls():
            if over_budget():
                res["train"].append({"impl": impl, "error": "skipped: --time-budget spent"})
                continue
            print(f"# train {impl} ...", file=sys.stderr, flush=True)
            res["train"].append(run_train(impl, cfg, docs))
            _write_json(res, cfg.out)
    if cfg.generate:
        prompts = make_prompts(cfg.batch, cfg.prompt, cfg.model.vocab, cfg.seed + 1, cfg.left_pad)
        for cache in cfg.caches:
            for impl in cfg.gen_impls():
                if over_budget():
                    res["generate"].append(
                        {"impl": impl, "cache": cache, "error": "skipped: --time-budget spent"}
                    )
                    continue
                print(f"# generate {impl} ({cache} cache) ...", file=sys.stderr, flush=True)
                res["generate"].append(run_generate(impl, cfg, cache, prompts))
                _write_json(res, cfg.out)
    res["checks"] = _checks(res, cfg.quick)
    res["elapsed_s"] = time.perf_counter() - t_start
    _write_json(res, cfg.out)
    return res


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _write_json(res: dict[str, Any], out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "e2e.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    return path


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    w = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head))]
    out.append("  ".join("-" * x for x in w))
    out += ["  ".join(c.ljust(w[i]) for i, c in enumerate(l)) for l in lines]
    return out


def format_table(res: dict[str, Any]) -> str:
    """The printed summary: one table for training, one for generation, then the checks."""
    h = res["header"]
    cfg = res["config"]
    ref = res.get("reference_ms", {})
    out = [f"# {h['device']}  " + "  ".join(f"{k} {v}" for k, v in h["versions"].items())]
    out.append(f"# {h['command']}")
    checks = res.get("checks", {})
    if res["train"]:
        nd = res.get("documents", {}).get("n_docs")
        out.append(
            f"\n## training step ({cfg['tokens']} tokens, {nd} docs, {cfg['optimizer']}, "
            f"{cfg['dtype']}; median of {cfg['steps']} after {cfg['warmup']} warm-up)"
        )
        lines = []
        for r in res["train"]:
            d = checks.get(f"train/{r['impl']}/doc_loss_max_abs_diff_vs_sdpa_padded")
            lines.append(
                [
                    r["impl"],
                    r.get("mask", "-"),
                    _f(r.get("first_step_s"), ".2f"),
                    _f(r.get("median_ms"), ".1f"),
                    _f(ref.get("train", {}).get(r["impl"]), ".1f"),
                    _f(r.get("tokens_per_s"), ",.0f"),
                    _f(r.get("peak_gib"), ".2f"),
                    _f(r.get("loss0"), ".5f"),
                    "ref" if r["impl"] == "sdpa_padded" and "loss0" in r else _f(d, ".2e"),
                    r.get("error", ""),
                ]
            )
        out += _table(
            [
                "impl",
                "mask",
                "first s",
                "median ms",
                "ref ms",
                "tok/s",
                "peak GiB",
                "loss0",
                "|doc loss diff|",
                "error",
            ],
            lines,
        )
    if res["generate"]:
        out.append(
            f"\n## greedy generate (batch {cfg['batch']}, prompt {cfg['prompt']}, "
            f"+{cfg['new_tokens']} tokens, {cfg['dtype']}; median of {cfg['gen_repeats']})"
        )
        lines = []
        for r in res["generate"]:
            cmp = r.get("vs_sdpa", {})
            is_ref = r["impl"] == "sdpa" and "tokens" in r
            lines.append(
                [
                    r["impl"],
                    r["cache"],
                    _f(r.get("first_call_s"), ".2f"),
                    _f(r.get("median_ms"), ".1f"),
                    _f(
                        ref.get("generate", {}).get(r["impl"]) if r["cache"] == "dynamic" else None,
                        ".1f",
                    ),
                    _f(r.get("new_tokens_per_s"), ",.0f"),
                    _f(r.get("peak_gib"), ".2f"),
                    "ref" if is_ref else _f(cmp.get("frac_equal"), ".3f"),
                    "ref" if is_ref else str(cmp.get("first_8_equal", "-")),
                    r.get("error", ""),
                ]
            )
        out += _table(
            [
                "impl",
                "cache",
                "first s",
                "median ms",
                "ref ms",
                "new tok/s",
                "peak GiB",
                "tokens = sdpa",
                "first 8 = sdpa",
                "error",
            ],
            lines,
        )
    if ref:
        out.append(
            "\nref ms: earlier measurement on the device machine's H100 with transformers "
            "5.17 (built-in flex_attention first step 71 s, first generate 20 s)."
        )
    if "quick_passed" in checks:
        out.append(f"\nquick checks passed: {checks['quick_passed']}")
    return "\n".join(out)


def plot_results(res: dict[str, Any], path: str) -> None:
    """Bars of median ms per implementation (training, generation), first-call time on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = res.get("reference_ms", {})
    panels = []
    if any("median_ms" in r for r in res["train"]):
        panels.append(
            ("training step", res["train"], "first_step_s", lambda r: r["impl"], ref.get("train"))
        )
    if any("median_ms" in r for r in res["generate"]):
        panels.append(
            (
                "greedy generate",
                res["generate"],
                "first_call_s",
                lambda r: f"{r['impl']}\n({r['cache']})",
                ref.get("generate"),
            )
        )
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, first_key, label, refs) in zip(axes[0], panels):
        rows = [r for r in rows if "median_ms" in r]
        xs = range(len(rows))
        colors = ["tab:green" if r["impl"] == "flex" else "tab:gray" for r in rows]
        ax.bar(xs, [r["median_ms"] for r in rows], color=colors)
        for x, r in zip(xs, rows):
            ax.annotate(
                f"{r['median_ms']:.0f} ms\nfirst {r[first_key]:.3g} s",
                (x, r["median_ms"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
            r_ms = (refs or {}).get(r["impl"]) if r.get("cache", "dynamic") == "dynamic" else None
            if r_ms is not None:  # the earlier measurement, as a dashed tick
                ax.hlines(r_ms, x - 0.4, x + 0.4, colors="k", linestyles="dashed")
        if refs:
            ax.plot([], [], "k--", label="earlier reference")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_xticks(list(xs), [label(r) for r in rows], fontsize=8)
        ax.set_ylabel("median ms per call")
        ax.set_title(title)
        ax.margins(y=0.25)
    fig.suptitle(f"hf_flexattn end-to-end, {res['header']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-flexattn bench-e2e",
        description="End-to-end training step and greedy generation of a random-init "
        "Llama-style model: hf_flexattn 'flex' vs Transformers' 'flex_attention' and 'sdpa'.",
    )
    p.add_argument(
        "--impls",
        default=None,
        help=f"comma list from {IMPL_CHOICES} ('sdpa' = both sdpa rows); default "
        "flex,flex_attention,sdpa on CUDA, flex,sdpa otherwise",
    )
    p.add_argument("--skip-train", action="store_true", help="no training rows")
    p.add_argument("--skip-generate", action="store_true", help="no generation rows")
    p.add_argument("--tokens", type=int, default=None, help="packed row length (16384)")
    p.add_argument("--doc-min", type=int, default=None, help="shortest document (256)")
    p.add_argument("--doc-max", type=int, default=None, help="longest document (4096)")
    p.add_argument(
        "--packing",
        default="flash_kwargs",
        choices=PACKINGS,
        help="what the packed row carries besides position_ids (flash_kwargs: "
        "cu_seq_lens_q/k + max_length_q/k, as DataCollatorWithFlattening("
        "return_flash_attn_kwargs=True))",
    )
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--steps", type=int, default=None, help="timed training steps (10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (2)")
    p.add_argument("--batch", type=int, default=None, help="generation batch (8)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length (2048)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (64)")
    p.add_argument(
        "--left-pad", type=int, default=None, help="left padding on every other prompt (0)"
    )
    p.add_argument(
        "--gen-repeats", type=int, default=None, help="timed generate calls after the first (3)"
    )
    p.add_argument("--cache", default="dynamic", help="comma list from dynamic,static")
    p.add_argument("--layers", type=int, default=None, help="model layers (8)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (2048)")
    p.add_argument(
        "--dtype", default=None, choices=sorted(_DTYPES), help="bf16 (fp32 with --quick)"
    )
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument(
        "--our-backend",
        default=None,
        choices=("triton", "torch"),
        help="force hf_flexattn's backend (sets HF_FLEXATTN_BACKEND)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; rows not started by then are recorded as skipped",
    )
    p.add_argument("--out", default="bench_e2e_out", help="output folder")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: 2 layers, hidden 64, 256 tokens, fp32, flex vs sdpa, "
        "with correctness checks (exit 1 if they fail)",
    )
    return p


def _csv(arg: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [x.strip() for x in arg.split(",") if x.strip()]
    if arg.strip() == "all":
        return list(allowed)
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"{flag} must be a comma list from {list(allowed)}, got {arg!r}.")
    return items


def config_from_args(args: argparse.Namespace) -> E2EConfig:
    """Turn parsed arguments into an :class:`E2EConfig` (``ValueError`` on bad values)."""
    q = args.quick
    device = resolve_device(args.device, q)
    default_impls = "flex,flex_attention,sdpa" if device.type == "cuda" and not q else "flex,sdpa"
    spec = QUICK_MODEL if q else ModelSpec()
    if args.layers is not None or args.hidden is not None:
        layers = args.layers if args.layers is not None else spec.layers
        hidden = args.hidden if args.hidden is not None else spec.hidden
        if layers < 1 or hidden < spec.heads * 1 or hidden % spec.heads:
            raise ValueError(
                f"--layers must be >= 1 and --hidden a multiple of {spec.heads}, "
                f"got {layers} and {hidden}."
            )
        spec = ModelSpec(**{**asdict(spec), "layers": layers, "hidden": hidden})

    def pick(val: Any, full: Any, quick: Any) -> Any:
        return val if val is not None else (quick if q else full)

    cfg = E2EConfig(
        device=device,
        dtype=_DTYPES[args.dtype] if args.dtype else (torch.float32 if q else torch.bfloat16),
        model=spec,
        impls=_csv(args.impls or default_impls, IMPL_CHOICES, "--impls"),
        train=not args.skip_train,
        generate=not args.skip_generate,
        tokens=pick(args.tokens, 16384, 256),
        doc_min=pick(args.doc_min, 256, 16),
        doc_max=pick(args.doc_max, 4096, 96),
        packing=args.packing,
        optimizer=args.optimizer,
        steps=pick(args.steps, 10, 2),
        warmup=pick(args.warmup, 2, 1),
        batch=pick(args.batch, 8, 4),
        prompt=pick(args.prompt, 2048, 32),
        new_tokens=pick(args.new_tokens, 64, 8),
        left_pad=pick(args.left_pad, 0, 5),
        gen_repeats=pick(args.gen_repeats, 3, 1),
        caches=_csv(args.cache, CACHES, "--cache"),
        seed=args.seed,
        out=args.out,
        our_backend=args.our_backend,
        time_budget=args.time_budget,
        quick=q,
    )
    for name, val, lo in (
        ("--tokens", cfg.tokens, 2),
        ("--doc-min", cfg.doc_min, 2),
        ("--doc-max", cfg.doc_max, 2),
        ("--steps", cfg.steps, 1),
        ("--warmup", cfg.warmup, 0),
        ("--batch", cfg.batch, 1),
        ("--prompt", cfg.prompt, 1),
        ("--new-tokens", cfg.new_tokens, 1),
        ("--left-pad", cfg.left_pad, 0),
        ("--gen-repeats", cfg.gen_repeats, 0),
    ):
        if val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val}.")
    if cfg.doc_max < cfg.doc_min:
        raise ValueError(f"--doc-max must be >= --doc-min ({cfg.doc_min}), got {cfg.doc_max}.")
    if cfg.left_pad >= cfg.prompt:
        raise ValueError(f"--left-pad must be < --prompt ({cfg.prompt}), got {cfg.left_pad}.")
    if args.skip_train and args.skip_generate:
        raise ValueError("--skip-train and --skip-generate together leave nothing to run.")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """``hf-flexattn bench-e2e [options]``; returns the exit status (1 if --quick checks
    fail)."""
    argv = [os.fspath(a) for a in (sys.argv[1:] if argv is None else argv)]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    res = run_benchmark(cfg, argv)
    print(format_table(res))
    paths = [os.path.join(cfg.out, "e2e.json")]
    if not args.no_plot:
        png = os.path.join(cfg.out, "e2e.png")
        try:
            plot_results(res, png)
            if os.path.exists(png):
                paths.append(png)
        except Exception as e:  # noqa: BLE001 - e.g. no matplotlib: keep the numbers
            print(f"# no plot: {_err(e)}", file=sys.stderr)
    print(f"\nwrote {', '.join(paths)}")
    if cfg.quick and not res["checks"].get("quick_passed", False):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
