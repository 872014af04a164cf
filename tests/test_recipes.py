"""The Accelerate recipe `recipes/packed_finetune.py`: packing, and training that equals
training on each document alone (fp32, CPU, tiny random-init models)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "packed_finetune.py"
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


def _load_recipe():
    spec = importlib.util.spec_from_file_location("packed_finetune", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


recipe = _load_recipe()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process run starts from a clean Accelerate state (it is a singleton)."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def _args(*extra: str, model: str = "llama", config: dict | None = None) -> list[str]:
    return [
        "--model-type",
        model,
        "--model-config",
        json.dumps(config or TINY),
        "--synthetic-docs",
        "40",
        "--synthetic-min-len",
        "5",
        "--synthetic-max-len",
        "40",
        "--max-tokens",
        "96",
        "--lr",
        "1e-3",
        "--log-every",
        "0",
        *extra,
    ]


# --------------------------------------------------------------------------------------------
# packing and arguments
# --------------------------------------------------------------------------------------------
def test_pack_documents_best_fit_decreasing():
    lengths = [2, 6, 2, 5, 4, 3, 2]
    rows = recipe.pack_documents(lengths, 8)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert len(rows) == math.ceil(sum(lengths) / 8)  # 24 tokens in 3 full rows
    # packing in order would need 4 rows here: [2, 6], [2, 5], [4, 3], [2]
    g = torch.Generator().manual_seed(0)
    many = torch.randint(1, 300, (2000,), generator=g).tolist()
    rows = recipe.pack_documents(many, 1024)
    assert sorted(i for r in rows for i in r) == list(range(len(many)))
    assert all(sum(many[i] for i in r) <= 1024 for r in rows)
    assert len(rows) <= math.ceil(sum(many) / 1024) + 1


def test_pack_documents_rejects_long_documents():
    with pytest.raises(ValueError, match="document 1 has 9 tokens"):
        recipe.pack_documents([3, 9], 8)


def test_pack_sampler_shuffles_per_epoch_and_keeps_rows():
    packs = [[0, 1], [2], [3, 4, 5], [6]]
    s = recipe.PackSampler(packs, seed=3)
    first = list(s)
    assert sorted(first) == sorted(packs) and list(s) == first
    orders = set()
    for epoch in range(6):
        s.set_epoch(epoch)
        orders.add(tuple(map(tuple, s)))
    assert len(orders) > 1


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--synthetic-docs", "4"], "exactly one of --model"),
        (["--model-type", "llama"], "exactly one of --dataset"),
        (["--model-type", "llama", "--dataset", "x.jsonl"], "needs a tokenizer"),
        (["--model-type", "llama", "--synthetic-docs", "4", "--model-config", "[1]"], "JSON"),
        (["--model-type", "llama", "--synthetic-docs", "4", "--grad-accum", "0"], "grad-accum"),
        (["--model-type", "llama", "--synthetic-docs", "4", "--max-tokens", "1"], "max-tokens"),
    ],
)
def test_parse_args_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        recipe.parse_args(argv)


def test_unknown_text_column_is_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"body": "a b"}) + "\n")
    tok = _word_tokenizer(tmp_path / "tok", ["a b"])
    args = recipe.parse_args(
        ["--model-type", "llama", "--dataset", str(data), "--tokenizer", str(tok)]
    )
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="--text-column 'text' is not a column"):
        recipe.load_documents(args, AutoTokenizer.from_pretrained(tok))


# --------------------------------------------------------------------------------------------
# training equals training on each document alone
# --------------------------------------------------------------------------------------------
def _reference_run(args, steps: int) -> tuple[list[float], torch.nn.Module]:
    """The recipe's optimizer steps done with eager attention, each document of each packed
    row as its own sequence: the loss sums every document's token losses and divides by
    the step's target count, as the recipe does."""
    from transformers import get_scheduler

    ref_args = recipe.parse_args(args)
    ref_args.attn_implementation = "eager"
    model = recipe.build_model(ref_args)
    ref_args.vocab_size = model.config.vocab_size
    tok = None
    if ref_args.dataset is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ref_args.tokenizer)
    ds = recipe.load_documents(ref_args, tok)
    loader = recipe.make_dataloader(ref_args, ds)
    rows = list(loader.batch_sampler)
    assert len(rows) >= steps * ref_args.grad_accum, "the reference runs inside one epoch"
    opt = recipe.make_optimizer(ref_args, model)
    sched = get_scheduler(ref_args.lr_scheduler, opt, num_warmup_steps=ref_args.warmup_steps,
                          num_training_steps=steps)
    F = torch.nn.functional
    losses = []
    accum = ref_args.grad_accum
    model.train()
    for step in range(steps):
        docs = [ds[i]["input_ids"] for row in rows[step * accum:(step + 1) * accum] for i in row]
        n = sum(len(d) - 1 for d in docs)
        total = 0.0
        for d in docs:
            ids = torch.tensor(d)[None]
            logits = model(ids, use_cache=False).logits[0, :-1]
            loss = F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum") / n
            loss.backward()
            total += float(loss.detach())
        if ref_args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ref_args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses, model


@pytest.mark.parametrize(
    "model,packing",
    [("llama", "cu_seq_lens"), ("qwen2", "position_ids"), ("gemma2", "cu_seq_lens"),
     # ALiBi families through hf_flexattn.patches
     ("bloom", "cu_seq_lens"), ("mpt", "position_ids")],
)
def test_recipe_equals_training_each_document_alone(tmp_path, model, packing):
    config = dict(TINY)
    if model == "gemma2":
        config.update(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    argv = _args("--max-steps", "3", "--grad-accum", "2", "--packing", packing, model=model,
                 config=config)
    out = tmp_path / "out"
    records = recipe.train(recipe.parse_args([*argv, "--output-dir", str(out)]))
    expect, ref_model = _reference_run(argv, 3)
    got = [r["loss"] for r in records]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expect), rtol=1e-5, atol=0)
    assert all(r["targets"] > 0 for r in records)
    # the saved model is the trained one: its weights equal the reference's after 3 steps
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, attn_implementation="flex")
    ref_state = ref_model.state_dict()
    for name, p in saved.state_dict().items():
        torch.testing.assert_close(p, ref_state[name], rtol=0, atol=2e-5, msg=name)


def _word_tokenizer(path: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]",
                                                                             "[EOS]"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.save_pretrained(path)
    return path


def test_recipe_text_dataset_one_epoch(tmp_path):
    g = torch.Generator().manual_seed(1)
    words = [f"w{i}" for i in range(60)]
    texts = [
        " ".join(words[j] for j in torch.randint(0, 60, (int(n),), generator=g).tolist())
        for n in torch.randint(3, 30, (20,), generator=g)
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    tok = _word_tokenizer(tmp_path / "tok", texts)
    argv = [
        "--model-type", "llama", "--model-config", json.dumps(TINY), "--dataset", str(data),
        "--tokenizer", str(tok), "--max-tokens", "64", "--lr", "1e-3", "--log-every", "0",
    ]
    records = recipe.train(recipe.parse_args(argv))
    # one epoch sees every document once: each has its words + EOS, so len(words) targets
    assert sum(r["targets"] for r in records) == sum(len(t.split()) for t in texts)
    expect, _ = _reference_run(argv, len(records))
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in records]), torch.tensor(expect), rtol=1e-5, atol=0
    )


_DIST_ENV = ("ACCELERATE_", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
             "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_")


def _free_port() -> int:
    """A TCP port nobody listens on now (for the launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_recipe_ddp_two_processes_equals_accumulation(tmp_path):
    """Two data-parallel processes (gloo, CPU) take the same optimizer steps as one process
    accumulating both rows: the loss is normalised by the targets of all processes."""
    log = tmp_path / "ddp.jsonl"
    argv = _args("--max-steps", "3")
    # no distributed settings inherited from the test process (a launch there, a monkeypatch)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DIST_ENV)}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes" / "configs" / "ddp.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(RECIPE),
        *argv, "--log-file", str(log),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # the ranks run in sessions of their own (torchrun), and hold the pipes open
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"accelerate launch did not finish in 300 s (normally ~15 s): {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    ddp = [json.loads(line) for line in log.read_text().splitlines()]
    # 40 documents fill 9 rows: 3 steps of 2 rows stay inside the first epoch
    single = recipe.train(recipe.parse_args([*argv, "--grad-accum", "2"]))
    assert [r["targets"] for r in ddp] == [r["targets"] for r in single]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in ddp]),
        torch.tensor([r["loss"] for r in single]),
        rtol=1e-5,
        atol=0,
    )


def test_recipe_bf16_mixed_precision(monkeypatch):
    """Accelerate's mixed_precision="bf16" (fp32 weights, bf16 autocast): the losses are as
    close to the fp32 per-document reference as those of eager attention under the same
    autocast (eager on the same packed rows, its mask built by Transformers)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    argv = _args("--max-steps", "3", "--packing", "position_ids")
    got = {}
    for impl in ("flex", "eager"):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        records = recipe.train(recipe.parse_args([*argv, "--attn-implementation", impl]))
        got[impl] = torch.tensor([r["loss"] for r in records], dtype=torch.float64)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    AcceleratorState._reset_state(True)
    expect = torch.tensor(_reference_run(argv, 3)[0], dtype=torch.float64)
    err_flex = (got["flex"] - expect).abs().max()
    err_eager = (got["eager"] - expect).abs().max()
    assert 0 < err_eager and err_flex <= 2 * err_eager + 1e-4, (err_flex, err_eager)


def test_synthetic_documents_need_no_datasets(monkeypatch):
    """Without `datasets` installed, --synthetic-docs gives the same documents and rows."""
    args = recipe.parse_args(_args())
    args.vocab_size = TINY["vocab_size"]
    with_ds = recipe.load_documents(args)
    monkeypatch.setitem(sys.modules, "datasets", None)
    plain = recipe.load_documents(args)
    assert len(plain) == len(with_ds) and plain["input_ids"] == with_ds["input_ids"]
    assert plain[3] == with_ds[3]
    assert list(recipe.make_dataloader(args, plain).batch_sampler) == list(
        recipe.make_dataloader(args, with_ds).batch_sampler
    )
