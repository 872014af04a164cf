"""``hf_flexattn.bench_e2e``: packed rows honour documents, greedy tokens, the --quick run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_flexattn import bench_e2e as be

TINY = be.QUICK_MODEL


# --------------------------------------------------------------------------------------------
# data helpers
# --------------------------------------------------------------------------------------------
def test_make_documents_fills_the_row_deterministically() -> None:
    d = be.make_documents(1000, 16, 96, 128, seed=3)
    assert sum(d.lengths) == 1000 == d.ids.numel()
    assert all(2 <= n <= 96 for n in d.lengths)
    assert all(16 <= n for n in d.lengths[:-1])
    assert d.offsets[0] == 0 and d.offsets[-1] == 1000
    assert int(d.ids.min()) >= 3 and int(d.ids.max()) < 128
    again = be.make_documents(1000, 16, 96, 128, seed=3)
    assert again.lengths == d.lengths and torch.equal(again.ids, d.ids)
    assert be.make_documents(1000, 16, 96, 128, seed=4).lengths != d.lengths
    # a remainder of 1 token is merged into the previous document
    d = be.make_documents(11, 5, 5, 16)
    assert d.lengths == [5, 6]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(total=0), "total must be an int >= 2"),
        (dict(min_len=1), "min_len must be an int >= 2"),
        (dict(min_len=50, max_len=10), r"max_len must be >= min_len \(50\), got 10"),
        (dict(vocab=3), "vocab must be an int >= 4"),
    ],
)
def test_make_documents_errors(kwargs: dict, match: str) -> None:
    args = dict(total=100, min_len=8, max_len=16, vocab=64) | kwargs
    with pytest.raises(ValueError, match=match):
        be.make_documents(**args)


def test_packed_and_padded_inputs() -> None:
    d = be.Documents(ids=torch.arange(10, 19), lengths=[4, 2, 3])
    p = d.packed_inputs("flash_kwargs", "cpu")
    assert p["input_ids"].tolist() == [list(range(10, 19))]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert p["labels"].tolist() == [[-100, 11, 12, 13, -100, 15, -100, 17, 18]]
    assert p["cu_seq_lens_q"].tolist() == [0, 4, 6, 9] == p["cu_seq_lens_k"].tolist()
    assert p["max_length_q"] == 4 == p["max_length_k"]
    p = d.packed_inputs("position_ids", "cpu")
    assert "cu_seq_lens_q" not in p and "position_ids" in p
    q = d.padded_inputs("cpu")
    assert q["input_ids"].tolist() == [[10, 11, 12, 13], [14, 15, 0, 0], [16, 17, 18, 0]]
    assert q["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert q["labels"].tolist() == [[10, 11, 12, 13], [14, 15, -100, -100], [16, 17, 18, -100]]
    with pytest.raises(ValueError, match="packing must be one of"):
        d.packed_inputs("bogus", "cpu")


def test_per_document_losses_against_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    d = be.make_documents(40, 3, 17, 11, seed=1)
    V = 11
    packed = torch.randn(1, 40, V, generator=g, dtype=torch.float64)
    labels = d.packed_inputs("position_ids", "cpu")["labels"]
    o = d.offsets
    expect = []
    for i in range(len(d.lengths)):
        lp = torch.log_softmax(packed[0, o[i] : o[i + 1] - 1], -1)
        tgt = d.ids[o[i] + 1 : o[i + 1]]
        expect.append(float(-lp[torch.arange(tgt.numel()), tgt].mean()))
    got = be.per_document_losses(packed, labels, d, "packed")
    assert got == pytest.approx(expect, rel=1e-14, abs=0)
    # the same logits rearranged one document per row, with junk in the padding
    pad = d.padded_inputs("cpu")
    padded = torch.randn(len(d.lengths), max(d.lengths), V, generator=g, dtype=torch.float64)
    for i, n in enumerate(d.lengths):
        padded[i, :n] = packed[0, o[i] : o[i + 1]]
    assert be.per_document_losses(padded, pad["labels"], d, "padded") == got
    with pytest.raises(ValueError, match="layout must be"):
        be.per_document_losses(packed, labels, d, "rows")


def test_make_prompts_left_padding() -> None:
    ids, mask = be.make_prompts(4, 10, 50, seed=2, left_pad=3)
    assert ids.shape == (4, 10) and mask.shape == (4, 10)
    assert mask[0].all() and mask[2].all()
    assert mask[1].tolist() == [0, 0, 0] + [1] * 7 and (ids[1, :3] == be.PAD_ID).all()
    with pytest.raises(ValueError, match=r"left_pad must be in \[0, prompt=10\), got 10"):
        be.make_prompts(2, 10, 50, left_pad=10)


def test_compare_tokens() -> None:
    ref = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1] * 10]
    got = [[1, 2, 3, 4, 5, 6, 7, 8, 0, 0], [1] * 10]
    c = be.compare_tokens(got, ref)
    assert c == {"frac_equal": 0.9, "first_8_equal": True, "first_divergence": [8, -1]}
    c = be.compare_tokens([[1, 0], [1, 1]], [[1, 2], [1, 1]], first=2)
    assert c["first_2_equal"] is False and c["first_divergence"] == [1, -1]
    with pytest.raises(ValueError, match="tokens must have the reference's shape"):
        be.compare_tokens([[1]], [[1, 2]])


# --------------------------------------------------------------------------------------------
# packing is honoured: float64, one document at a time as the reference
# --------------------------------------------------------------------------------------------
def _summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies in the logits' dtype (Transformers' own loss
    upcasts to fp32 only, so float64 checks compute it here)."""
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum"
    )


@pytest.mark.parametrize("packing", be.PACKINGS)
def test_packed_flex_equals_separate_documents_float64(packing: str) -> None:
    """Per-document losses and every gradient of a training step on a packed row (ours)
    equal those of the documents run one at a time through SDPA, in float64."""
    d = be.make_documents(200, 24, 90, TINY.vocab, seed=5)
    assert len(d.lengths) >= 3
    flex = be.build_model(TINY, "flex", torch.float64, "cpu", seed=1)
    ref = be.build_model(TINY, "sdpa", torch.float64, "cpu", seed=1)
    for a, b in zip(flex.parameters(), ref.parameters()):
        assert torch.equal(a, b)

    inputs = d.packed_inputs(packing, "cpu")
    labels = inputs.pop("labels")
    logits = flex(**inputs, use_cache=False).logits
    assert logits.dtype == torch.float64
    _summed_token_loss(logits, labels).backward()
    got = be.per_document_losses(logits, labels, d, "packed")

    expect = []
    o = d.offsets
    for i in range(len(d.lengths)):
        ids = d.ids[None, o[i] : o[i + 1]]
        lg = ref(input_ids=ids, use_cache=False).logits
        _summed_token_loss(lg, ids).backward()
        expect.append(float(_summed_token_loss(lg.detach(), ids)) / (d.lengths[i] - 1))
    assert got == pytest.approx(expect, rel=1e-12, abs=0)
    for (name, a), b in zip(flex.named_parameters(), ref.parameters()):
        scale = float(b.grad.abs().max())
        assert scale > 0, name
        assert float((a.grad - b.grad).abs().max()) <= 1e-10 * scale, name


# --------------------------------------------------------------------------------------------
# the --quick run (what CI runs) and the command line
# --------------------------------------------------------------------------------------------
def test_quick_run(tmp_path, capsys) -> None:
    out = tmp_path / "e2e"
    assert be.main(["--quick", "--out", str(out), "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "quick checks passed: True" in text
    res = json.loads((out / "e2e.json").read_text())
    assert res["config"]["dtype"] == "float32" and res["config"]["quick"]
    train = {r["impl"]: r for r in res["train"]}
    assert list(train) == ["sdpa_padded", "sdpa_packed", "sdpa_causal", "flex"]
    for r in train.values():
        assert "error" not in r, r.get("traceback")
        assert len(r["step_ms"]) == 2 and r["median_ms"] > 0 and r["first_step_s"] > 0
        assert math.isfinite(r["loss0"])
    n_docs = res["documents"]["n_docs"]
    assert sum(res["documents"]["lengths"]) == 256 and n_docs >= 3
    ref = train["sdpa_padded"]["doc_losses"]
    assert len(ref) == n_docs
    # packing honoured: per-document losses of the packed row equal the separate documents
    for x, y in zip(train["flex"]["doc_losses"], ref):
        assert abs(x - y) <= 1e-4
    # ... and the check can tell: causal attention over the whole row changes them
    causal = max(abs(x - y) for x, y in zip(train["sdpa_causal"]["doc_losses"], ref))
    assert causal > 1e-3
    assert res["checks"]["train/flex/doc_loss_max_abs_diff_vs_sdpa_padded"] <= 1e-4
    # greedy tokens, with left padding on every other prompt
    gen = {r["impl"]: r for r in res["generate"]}
    assert list(gen) == ["sdpa", "flex"]
    for r in gen.values():
        assert "error" not in r, r.get("traceback")
    assert res["config"]["left_pad"] > 0
    assert gen["flex"]["tokens"] == gen["sdpa"]["tokens"]
    assert len(gen["flex"]["tokens"]) == 4 and len(gen["flex"]["tokens"][0]) == 8
    assert gen["flex"]["vs_sdpa"]["frac_equal"] == 1.0
    assert res["checks"]["quick_passed"] is True


def test_a_failing_impl_is_recorded_not_raised(tmp_path, monkeypatch) -> None:
    real = be.build_model

    def build(spec, attn, *args, **kwargs):
        if attn == "flex":
            raise RuntimeError("boom from the test")
        return real(spec, attn, *args, **kwargs)

    monkeypatch.setattr(be, "build_model", build)
    cfg = be.E2EConfig(
        device=torch.device("cpu"),
        dtype=torch.float32,
        model=TINY,
        impls=["flex", "sdpa_padded"],
        tokens=64,
        doc_min=8,
        doc_max=32,
        steps=1,
        warmup=0,
        batch=2,
        prompt=8,
        new_tokens=2,
        gen_repeats=0,
        out=str(tmp_path),
        quick=True,
    )
    res = be.run_benchmark(cfg)
    train = {r["impl"]: r for r in res["train"]}
    assert train["flex"]["error"] == "RuntimeError: boom from the test"
    assert "median_ms" in train["sdpa_padded"]
    gen = {r["impl"]: r for r in res["generate"]}
    assert "error" in gen["flex"] and "tokens" in gen["sdpa"] and "median_ms" not in gen["sdpa"]
    assert res["checks"]["quick_passed"] is False
    table = be.format_table(res)
    assert "boom from the test" in table
    assert json.loads((tmp_path / "e2e.json").read_text())["train"][0]["impl"] == "sdpa_padded"


def test_impl_selection_and_order() -> None:
    cfg = be.E2EConfig(device=torch.device("cpu"), dtype=torch.float32)
    cfg.impls = ["flex_attention", "sdpa", "flex"]
    assert cfg.train_impls() == [
        "sdpa_padded",
        "sdpa_packed",
        "sdpa_causal",
        "flex",
        "flex_attention",
    ]
    assert cfg.gen_impls() == ["sdpa", "flex", "flex_attention"]
    cfg.impls = ["sdpa_padded", "flex"]
    assert cfg.train_impls() == ["sdpa_padded", "flex"]
    assert cfg.gen_impls() == ["sdpa", "flex"]
    assert not cfg.is_default_shape()  # CPU: the H100 reference numbers do not apply
    assert cfg.max_positions() == 16384


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--impls", "flex,eager"], "--impls must be a comma list"),
        (["--doc-min", "100", "--doc-max", "50"], r"--doc-max must be >= --doc-min \(100\)"),
        (["--steps", "0"], "--steps must be an int >= 1, got 0"),
        (["--cache", "offloaded"], "--cache must be a comma list"),
        (["--left-pad", "32"], r"--left-pad must be < --prompt \(32\), got 32"),
        (["--skip-train", "--skip-generate"], "leave nothing to run"),
    ],
)
def test_cli_errors(argv: list[str], match: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        be.main(["--quick", *argv])
    assert exc.value.code == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)
