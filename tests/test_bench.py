"""``hf_flexattn.bench``: exact allowed-pair counts, the FLOP formula, and a --quick CPU run."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hf_flexattn import bench


def _dense_count(mask_mod, B: int, H: int, L: int, S: int) -> int:
    """Count allowed positions by calling the mod once per (b, h, q, kv) on 0-d tensors."""
    t = lambda i: torch.tensor(i)
    n = 0
    for b in range(B):
        for h in range(H):
            for q in range(L):
                for kv in range(S):
                    n += bool(mask_mod(t(b), t(h), t(q), t(kv)))
    return n


_LENGTHS = torch.tensor([3, 9])
_IDS = torch.tensor([0] * 4 + [1] * 6 + [2] * 7)  # 17 tokens, 3 documents


def _mask_cases():
    return {
        "causal": lambda b, h, q, kv: q >= kv,
        "window4": lambda b, h, q, kv: (q >= kv) & (q - kv < 4),
        "documents": lambda b, h, q, kv: (_IDS[q] == _IDS[kv]) & (q >= kv),
        "prefix_b": lambda b, h, q, kv: (kv < _LENGTHS[b]) | (q >= kv),  # depends on b
        "heads": lambda b, h, q, kv: (h % 2 == 0) | (q >= kv + h),  # depends on h
        "nothing": lambda b, h, q, kv: q < 0,
    }


@pytest.mark.parametrize("name", list(_mask_cases()))
@pytest.mark.parametrize("chunk", [7, 1 << 20])  # tiny chunks: many chunks of 1 row
def test_count_allowed_pairs_matches_dense(name: str, chunk: int) -> None:
    mod = _mask_cases()[name]
    B, H, L, S = 2, 3, 13, 17
    got = bench.count_allowed_pairs(mod, B, H, L, S, chunk_elems=chunk)
    assert got == _dense_count(mod, B, H, L, S)


def test_count_allowed_pairs_full_and_errors() -> None:
    assert bench.count_allowed_pairs(None, 2, 3, 5, 7) == 2 * 3 * 5 * 7
    with pytest.raises(ValueError, match="L must be a positive int"):
        bench.count_allowed_pairs(None, 1, 1, 0, 4)


def test_attention_flops() -> None:
    # 2 matmuls of 2*pairs*D each; bwd 2.5x (5 matmuls); fwd+bwd 3.5x
    assert bench.attention_flops(10, 8, "fwd") == 320.0
    assert bench.attention_flops(10, 8, "decode") == 320.0
    assert bench.attention_flops(10, 8, "bwd") == 800.0
    assert bench.attention_flops(10, 8, "fwdbwd") == 1120.0
    assert bench.attention_flops(10, 8, "fwd", head_dim_v=4) == 2 * 10 * 8 + 2 * 10 * 4
    with pytest.raises(ValueError, match="direction"):
        bench.attention_flops(10, 8, "sideways")


def test_parse_heads() -> None:
    assert bench.parse_heads("32/32/128, 64/8/128") == [(32, 32, 128), (64, 8, 128)]
    with pytest.raises(ValueError, match="Hq/Hkv/D"):
        bench.parse_heads("32x8")
    with pytest.raises(ValueError, match="multiple of Hkv"):
        bench.parse_heads("12/8/64")


def test_doc_offsets() -> None:
    off = bench.doc_offsets(192)
    lens = off[1:] - off[:-1]
    assert off[0] == 0 and off[-1] == 192 and len(lens) == bench.NUM_DOCS
    assert bool((lens > 0).all())
    assert torch.equal(off, bench.doc_offsets(192))  # fixed seed


def _expected_pairs(variant: str, L: int, S: int, params: dict) -> int:
    """Allowed pairs per (b, h) from closed forms (queries are the last L of S positions)."""
    off = S - L
    if variant == "full":
        return L * S
    n = 0
    for i in range(off, S):
        if variant in ("causal", "alibi", "softcap"):
            n += i + 1
        elif variant == "sliding_window":
            n += min(i + 1, params["window"])
        elif variant == "prefix_lm":
            n += max(i + 1, params["prefix"])
        elif variant == "documents":
            start = 0
            for ln in params["doc_lengths"]:
                if i < start + ln:
                    n += i - start + 1
                    break
                start += ln
    return n


def test_quick_run_writes_outputs(tmp_path) -> None:
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    for ext in ("json", "csv", "png"):
        assert (tmp_path / f"results.{ext}").stat().st_size > 0
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "results.json").read_text())
    hdr = data["header"]
    assert hdr["command"] == f"hf-flexattn bench --quick --out {tmp_path}"
    assert hdr["versions"]["torch"] == torch.__version__ and "date" in hdr and "device" in hdr
    rows = data["rows"]
    assert [(r["variant"], r["heads"]) for r in rows] == [
        (v, h) for v in bench.ALL_VARIANTS for h in ("2/2/16", "2/1/16")
    ]
    for r in rows:
        per_bh = _expected_pairs(r["variant"], r["L"], r["S"], r.get("params", {}))
        assert r["pairs"] == r["B"] * r["Hq"] * per_bh, r["variant"]
        # ours and the reference (torch's eager flex / SDPA) agree in fp32
        assert r["max_abs_diff_vs_ref"] < 1e-4, (r["variant"], r["max_abs_diff_vs_ref"])
    # every cell of ours is measured, and its TFLOPs follow the formula
    rows_by = {(r["variant"], r["heads"]): r for r in rows}
    ours = [c for c in data["cells"] if c["impl"] == "ours"]
    assert {c["direction"] for c in ours} >= {"fwd", "fwdbwd"}
    for c in ours:
        if c["direction"] == "bwd" and c["error"]:
            continue  # fwdbwd - fwd can come out negative on a noisy CPU; recorded as error
        assert c["error"] is None and c["ms"] > 0, c
        r = rows_by[(c["variant"], c["heads"])]
        want = bench.attention_flops(r["pairs"], r["D"], c["direction"]) / (c["ms"] * 1e-3)
        assert c["tflops"] == pytest.approx(want / 1e12, rel=1e-12)
    # SDPA only where it can express the variant; cuDNN has no CPU kernel: a recorded error
    sdpa_variants = {c["variant"] for c in data["cells"] if c["impl"].startswith("sdpa")}
    assert sdpa_variants == {"full", "causal"}
    assert all(c["error"] for c in data["cells"] if c["impl"] == "sdpa_cudnn")
    flash = [c for c in data["cells"] if c["impl"] == "sdpa_flash" and c["direction"] != "bwd"]
    assert len(flash) == 8 and all(c["error"] is None for c in flash), flash
    with open(tmp_path / "results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(data["cells"])
    assert set(lines[0]) == {
        "variant",
        "heads",
        "impl",
        "direction",
        "ms",
        "tflops",
        "error",
        "note",
    }


def test_decode_via_cli(tmp_path) -> None:
    from hf_flexattn.cli import main as cli_main

    # "--" keeps the top-level parser from reading bench's options
    argv = [
        "bench",
        "--",
        "--quick",
        "--decode",
        "--variants",
        "causal,sliding_window,documents",
        "--heads",
        "2/1/16",
        "--impls",
        "ours,sdpa_flash",
        "--no-plot",
        "--out",
        str(tmp_path),
    ]
    assert cli_main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["causal"]["pairs"] == 2 * 192  # the last query row sees the whole cache
    assert rows["sliding_window"]["pairs"] == 2 * rows["sliding_window"]["params"]["window"]
    assert rows["documents"]["pairs"] == 2 * rows["documents"]["params"]["doc_lengths"][-1]
    assert {c["direction"] for c in data["cells"]} == {"decode"}
    assert rows["causal"]["max_abs_diff_vs_ref"] < 1e-4  # vs SDPA (is_causal=False)
    assert not (tmp_path / "results.png").exists()


def test_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--variants", "bogus"])
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--heads", "3/2/16"])


def test_from_json_merges_runs(tmp_path) -> None:
    common = ["--quick", "--variants", "causal", "--impls", "ours", "--no-plot"]
    assert bench.main([*common, "--heads", "2/2/16", "--out", str(tmp_path / "a")]) == 0
    assert bench.main([*common, "--heads", "2/1/16", "--out", str(tmp_path / "b")]) == 0
    argv = [
        "--from-json",
        str(tmp_path / "a" / "results.json"),
        str(tmp_path / "b" / "results.json"),
        "--out",
        str(tmp_path / "m"),
    ]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [r["heads"] for r in data["rows"]] == ["2/2/16", "2/1/16"]
    assert len(data["header"]["commands"]) == 2
    assert (tmp_path / "m" / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_time_budget_skips_cells(tmp_path) -> None:
    argv = [
        "--quick",
        "--time-budget",
        "0",
        "--variants",
        "causal",
        "--heads",
        "2/1/16",
        "--no-plot",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"][0]["skipped"] == "time budget"
    assert data["cells"] and all(c["error"].startswith("skipped") for c in data["cells"])
