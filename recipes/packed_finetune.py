"""Packed-sequence fine-tuning of a causal LM with Accelerate, `datasets` and hf_flexattn.

Documents are tokenized with `datasets`, packed into rows of at most ``--max-tokens`` tokens
(best-fit decreasing, so rows are nearly full), and flattened by Transformers'
``DataCollatorWithFlattening``: one row per micro-batch, ``position_ids`` restarting at 0 at
each document, ``labels`` ``-100`` on each document's first token and, with
``--packing cu_seq_lens`` (the default), ``cu_seq_lens_q/k``. With
``attn_implementation="flex"`` each row runs as one block-sparse kernel call whose mask keeps
every document to itself: no padding, no attention across documents.

The loss is the mean next-token cross-entropy over every target token of the optimizer step,
across all micro-batches (``--grad-accum``) and all processes, so a step is the same update
whether it runs on one process with accumulation or on several (DDP, FSDP2) without.

    # one GPU (or the CPU)
    accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/packed_finetune.py \\
        --model path/to/model --dataset path/to/data.jsonl --max-tokens 16384
    # 8 GPUs, data parallel / fully sharded
    accelerate launch --config_file recipes/configs/ddp.yaml recipes/packed_finetune.py ...
    accelerate launch --config_file recipes/configs/fsdp2.yaml recipes/packed_finetune.py ...
    # no checkpoint at hand: a random-init model from a config, random documents
    accelerate launch recipes/packed_finetune.py --model-type llama \\
        --model-config '{"hidden_size": 256, "num_hidden_layers": 2}' --synthetic-docs 512

``python recipes/packed_finetune.py --help`` lists every option.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PACKINGS = ("cu_seq_lens", "position_ids")
DATA_FILE_TYPES = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Packed-sequence fine-tuning with Accelerate and attn_implementation='flex'."
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", help="path or hub id for from_pretrained")
    m.add_argument(
        "--model-type",
        help="instead of --model: a random-init model of this type (AutoConfig.for_model)",
    )
    m.add_argument(
        "--model-config",
        default="{}",
        help="with --model-type: JSON of config fields, e.g. '{\"hidden_size\": 256}'",
    )
    m.add_argument("--tokenizer", help="tokenizer path or id (default: --model)")
    m.add_argument("--attn-implementation", default="flex", help="flex (default), sdpa, eager")
    m.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the weights"
    )
    m.add_argument("--gradient-checkpointing", action="store_true")

    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        help="hub dataset name, a folder written by Dataset.save_to_disk, or a data file "
        "(.json, .jsonl, .csv, .parquet, .txt)",
    )
    d.add_argument("--dataset-config", help="the dataset's configuration name")
    d.add_argument("--split", default="train")
    d.add_argument("--text-column", default="text")
    d.add_argument(
        "--synthetic-docs",
        type=int,
        default=0,
        help="instead of --dataset: this many documents of random tokens (no tokenizer)",
    )
    d.add_argument("--synthetic-min-len", type=int, default=16)
    d.add_argument("--synthetic-max-len", type=int, default=512)
    d.add_argument("--max-tokens", type=int, default=8192, help="tokens per packed row")
    d.add_argument(
        "--packing",
        default="cu_seq_lens",
        choices=PACKINGS,
        help="what marks the documents: cu_seq_lens_q/k (+ position_ids), or position_ids only",
    )

    t = p.add_argument_group("training")
    t.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: --epochs)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--grad-accum", type=int, default=1, help="packed rows per process per step")
    t.add_argument("--lr", type=float, default=2e-5)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--lr-scheduler", default="cosine", help="a transformers.get_scheduler name")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")

    o = p.add_argument_group("output")
    o.add_argument("--output-dir", help="save the model (and tokenizer) here at the end")
    o.add_argument("--log-file", help="append one JSON line per optimizer step")
    o.add_argument("--log-every", type=int, default=10, help="print every N steps (0: never)")
    return p


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (errors name the flag and the fix)."""
    args = build_parser().parse_args(argv)
    if (args.model is None) == (args.model_type is None):
        raise ValueError(
            "give exactly one of --model (a checkpoint) or --model-type (random init)."
        )
    if (args.dataset is None) == (args.synthetic_docs <= 0):
        raise ValueError("give exactly one of --dataset or --synthetic-docs N (N >= 1).")
    if args.dataset is not None and args.tokenizer is None and args.model is None:
        raise ValueError("--dataset needs a tokenizer: pass --tokenizer (or --model).")
    try:
        cfg = json.loads(args.model_config)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--model-config must be a JSON object, got {args.model_config!r}: {e}"
        ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--model-config must be a JSON object, got {args.model_config!r}.")
    args.model_config = cfg
    _positive("max-tokens", args.max_tokens, 2)
    _positive("grad-accum", args.grad_accum)
    _positive("epochs", args.epochs)
    _positive("max-steps", args.max_steps, 0)
    _positive("synthetic-min-len", args.synthetic_min_len, 2)
    if args.synthetic_max_len < args.synthetic_min_len:
        raise ValueError(
            f"--synthetic-max-len ({args.synthetic_max_len}) must be >= --synthetic-min-len "
            f"({args.synthetic_min_len})."
        )
    return args


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
def pack_documents(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group documents into rows of at most ``max_tokens`` tokens, best-fit decreasing.

    ``lengths[i]`` is document i's token count (each at most ``max_tokens``). Returns lists
    of document indices, one per row; every document is in exactly one row. Longest
    documents are placed first, each into the fullest row it still fits, so rows come out
    nearly full (unlike packing in order, which leaves the tail of each row empty).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    for i, n in enumerate(lengths):
        if not 0 < n <= max_tokens:
            raise ValueError(f"document {i} has {n} tokens; each needs 1..max_tokens={max_tokens}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), sorted
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))  # the row with the least room that fits
        if j == len(free):
            rows.append([i])
            room, r = max_tokens - n, len(rows) - 1
        else:
            room, r = free.pop(j)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, r))
    return [sorted(r) for r in rows]


class PackSampler(torch.utils.data.Sampler):
    """Yields one packed row (a list of dataset indices) at a time, in an order shuffled
    per epoch (``set_epoch``) from ``seed``; the same order on every process."""

    def __init__(self, packs: list[list[int]], seed: int = 0) -> None:
        self.packs = packs
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.packs)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return iter([self.packs[i] for i in order])

    def __len__(self) -> int:
        return len(self.packs)


def count_targets(batch: dict[str, Any]) -> int:
    """Next-token targets in a batch: labels after the shift that are not ``-100``."""
    return int((batch["labels"][..., 1:] != -100).sum())


# --------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_flexattn  # noqa: F401 - registers attn_implementation="flex"

    dtype = DTYPES[args.dtype]
    if args.model is not None:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, attn_implementation=args.attn_implementation, dtype=dtype
        )
    else:
        config = AutoConfig.for_model(args.model_type, **args.model_config)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=args.attn_implementation, dtype=dtype
        )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _load_raw(args: argparse.Namespace) -> Any:
    import datasets

    path = args.dataset
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path):
        if ext not in DATA_FILE_TYPES:
            raise ValueError(
                f"--dataset {path!r}: unknown file type {ext!r}; use one of "
                f"{sorted(DATA_FILE_TYPES)}, a save_to_disk folder, or a hub name."
            )
        return datasets.load_dataset(DATA_FILE_TYPES[ext], data_files=path, split="train")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
        ds = datasets.load_from_disk(path)
        return ds[args.split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(path, args.dataset_config, split=args.split)


class _ListDataset(torch.utils.data.Dataset):
    """``--synthetic-docs`` without `datasets` installed: rows ``{"input_ids": [...]}`` by
    index, the column by name (as ``datasets.Dataset`` gives them)."""

    def __init__(self, docs: list[list[int]]) -> None:
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int | str) -> Any:
        if isinstance(i, str):
            if i != "input_ids":
                raise KeyError(i)
            return self.docs
        return {"input_ids": self.docs[i]}


def load_documents(args: argparse.Namespace, tokenizer: Any = None) -> Any:
    """A ``datasets.Dataset`` with one ``input_ids`` list per document: tokenized text
    (an EOS appended when the tokenizer has one) or ``--synthetic-docs`` random tokens; each
    cut to ``--max-tokens`` and kept only if it has at least 2 tokens (one target).
    Random documents need no `datasets` (a plain list-backed dataset stands in)."""
    cap = args.max_tokens
    if args.dataset is None:
        vocab = int(args.vocab_size)
        g = torch.Generator().manual_seed(args.seed)
        lo, hi = args.synthetic_min_len, args.synthetic_max_len  # lo >= 2: a target each
        lens = torch.randint(lo, hi + 1, (args.synthetic_docs,), generator=g).tolist()
        docs = [torch.randint(3, vocab, (n,), generator=g).tolist()[:cap] for n in lens]
        try:
            import datasets
        except ImportError:
            return _ListDataset(docs)
        return datasets.Dataset.from_dict({"input_ids": docs})
    raw = _load_raw(args)
    if args.text_column not in raw.column_names:
        raise ValueError(
            f"--text-column {args.text_column!r} is not a column of the dataset "
            f"(columns: {raw.column_names})."
        )
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[args.text_column], add_special_tokens=True)["input_ids"]
        return {"input_ids": [x + [eos] if eos is not None else x for x in ids]}

    ds = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="tokenize")
    ds = ds.map(lambda ex: {"input_ids": ex["input_ids"][:cap]}, desc="truncate")
    ds = ds.filter(lambda ex: len(ex["input_ids"]) >= 2, desc="drop one-token documents")
    if len(ds) == 0:
        raise ValueError("the dataset has no document with 2 or more tokens.")
    return ds


def make_dataloader(args: argparse.Namespace, ds: Any) -> torch.utils.data.DataLoader:
    """One packed row per batch, flattened by ``DataCollatorWithFlattening``."""
    from transformers import DataCollatorWithFlattening

    lengths = [len(x) for x in ds["input_ids"]]
    sampler = PackSampler(pack_documents(lengths, args.max_tokens), seed=args.seed)
    collator = DataCollatorWithFlattening(
        return_flash_attn_kwargs=args.packing == "cu_seq_lens", return_position_ids=True
    )
    return torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=collator, num_workers=args.num_workers
    )


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with ``--weight-decay`` on matrices only (not on norms and biases)."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=args.lr,
    )


def _steps(args: argparse.Namespace, rows_per_process: int) -> int:
    per_epoch = rows_per_process // args.grad_accum
    if per_epoch == 0 and not args.max_steps:
        raise ValueError(
            f"one optimizer step takes --grad-accum {args.grad_accum} rows per process, but "
            f"each process gets only {rows_per_process} per epoch: lower --grad-accum or "
            "--max-tokens, or add data."
        )
    return args.max_steps or per_epoch * args.epochs


def _micro_batches(
    loader: Any, sampler: PackSampler, n: int, state: dict[str, Any]
) -> list[dict[str, Any]]:
    """The next ``n`` batches, starting a new epoch (reshuffled) when the loader runs out."""
    out = []
    while len(out) < n:
        try:
            out.append(next(state["it"]))
        except StopIteration:
            state["epoch"] += 1
            sampler.set_epoch(state["epoch"])
            state["it"] = iter(loader)
    return out


def train(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the fine-tuning; returns one record per optimizer step (``loss``: the mean
    next-token loss over the step's targets on all processes, ``targets``, ``lr``,
    ``grad_norm``, ``seconds``), the same on every process."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_scheduler

    accelerator = Accelerator()
    set_seed(args.seed)
    model = build_model(args)
    tokenizer = None
    if args.dataset is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    args.vocab_size = model.config.vocab_size
    with accelerator.main_process_first():
        ds = load_documents(args, tokenizer)
    loader = make_dataloader(args, ds)
    sampler = loader.batch_sampler  # the PackSampler (prepare wraps it per process)

    optimizer = make_optimizer(args, model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps = _steps(args, len(loader))
    scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=steps
    )
    world = accelerator.num_processes
    model.train()
    state = {"it": iter(loader), "epoch": 0}
    records: list[dict[str, Any]] = []
    log = open(args.log_file, "a") if args.log_file and accelerator.is_main_process else None
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            micros = _micro_batches(loader, sampler, args.grad_accum, state)
            local = torch.tensor(
                float(sum(count_targets(b) for b in micros)), device=accelerator.device
            )
            targets = accelerator.reduce(local, reduction="sum")
            total = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(micros):
                sync = i == len(micros) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    # sum of this row's token losses / every target of the step; gradients
                    # are averaged over processes, hence the factor `world`
                    loss = model(**batch, num_items_in_batch=targets, use_cache=False).loss
                    accelerator.backward(loss * world)
                total += loss.detach().float()
            grad_norm = None
            if args.max_grad_norm > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                grad_norm = float(norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rec = {
                "step": step + 1,
                "loss": float(accelerator.reduce(total, reduction="sum")),
                "targets": int(targets),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "seconds": time.perf_counter() - t0,
            }
            records.append(rec)
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if args.log_every and (step + 1) % args.log_every == 0:
                accelerator.print(
                    f"step {rec['step']}/{steps}  loss {rec['loss']:.4f}  "
                    f"targets {rec['targets']}  lr {rec['lr']:.3g}  {rec['seconds'] * 1e3:.0f} ms"
                )
    finally:
        if log is not None:
            log.close()
    if args.output_dir:
        save(accelerator, model, tokenizer, args.output_dir)
    # Drop the DDP wrapper while the process group is still registered. Otherwise its
    # Reducer holds the group's last reference, and freeing it destroys the gloo group with
    # the GIL held: that joins gloo's worker threads, one of which may be waiting for the
    # GIL to free the last all-reduce's tensors (a deadlock at exit, seen on the CPU).
    # destroy_process_group (in end_training) releases the GIL while it destroys the group.
    accelerator.wait_for_everyone()
    model, optimizer, scheduler, loader = accelerator.free_memory(
        model, optimizer, scheduler, loader
    )
    state.clear()
    accelerator.end_training()
    return records


def save(accelerator: Any, model: torch.nn.Module, tokenizer: Any, output_dir: str) -> None:
    """Write the full (unsharded) model with ``save_pretrained`` from the main process."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    records = train(args)
    if records and int(os.environ.get("RANK", "0")) == 0:
        first, last = records[0], records[-1]
        print(f"{len(records)} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}")
    return 0 if all(math.isfinite(r["loss"]) for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
