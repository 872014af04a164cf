"""Public API: argument checks, backend choice, CLI, and parity with torch's flex_attention."""

import math
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import flex_attention as torch_fa

import hf_flexattn
from hf_flexattn import create_block_mask, flex_attention
from hf_flexattn.api import resolve_backend


def _qkv(B=1, Hq=2, Hkv=2, L=20, S=20, E=16, Ev=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, Ev or E, generator=g, dtype=dtype)
    return q, k, v


def causal(b, h, q, kv):
    return q >= kv


OPTS = {"backend": "torch"}


def test_default_matches_dense_softmax():
    q, k, v = _qkv(L=37, S=53, dtype=torch.float64)
    out, lse = flex_attention(q, k, v, return_lse=True, kernel_options=OPTS)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    ref = torch.softmax(s, -1) @ v
    assert out.shape == (1, 2, 37, 16) and lse.dtype == torch.float64  # as torch does
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-10, atol=1e-10)
    q32, k32, v32 = q.float(), k.float(), v.float()
    _, lse32 = flex_attention(q32, k32, v32, return_lse=True, kernel_options=OPTS)
    assert lse32.dtype == torch.float32


def test_custom_scale_and_gqa():
    q, k, v = _qkv(Hq=6, Hkv=2, L=9, S=11, dtype=torch.float64)
    out = flex_attention(q, k, v, scale=0.3, enable_gqa=True, kernel_options=OPTS)
    kk = k.repeat_interleave(3, dim=1)
    vv = v.repeat_interleave(3, dim=1)
    ref = torch.softmax(q @ kk.transpose(-1, -2) * 0.3, -1) @ vv
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_matches_torch_flex_attention_forward():
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, L=130, S=130, E=32)

    def bias(score, b, h, qi, kvi):
        return score + (qi - kvi).abs() * 0.01 * (h + 1)

    bm_t = torch_fa.create_block_mask(causal, 2, 1, 130, 130, device="cpu", BLOCK_SIZE=32)
    ref = torch_fa.flex_attention(q, k, v, score_mod=bias, block_mask=bm_t, enable_gqa=True)
    # torch's own BlockMask is accepted, and so is ours
    out_t = flex_attention(
        q, k, v, score_mod=bias, block_mask=bm_t, enable_gqa=True, kernel_options=OPTS
    )
    bm = create_block_mask(causal, 2, 1, 130, 130, device="cpu", BLOCK_SIZE=32)
    out = flex_attention(
        q, k, v, score_mod=bias, block_mask=bm, enable_gqa=True, kernel_options=OPTS
    )
    torch.testing.assert_close(out_t, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_cpu_training_gradients():
    q, k, v = _qkv(L=33, S=33, dtype=torch.float64)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    bm = create_block_mask(causal, None, None, 33, 33, device="cpu", BLOCK_SIZE=16)
    out = flex_attention(q, k, v, block_mask=bm, kernel_options=OPTS)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    mask = torch.ones(33, 33, dtype=torch.bool).tril()
    s = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~mask, float("-inf"))
    (torch.softmax(s, -1) @ v).square().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=1e-9, atol=1e-9)


def test_autocast_casts_inputs_like_sdpa():
    """Under bf16 autocast with fp32 weights, rotary embeddings leave q and k in fp32 while v
    is bf16: flex_attention takes them as SDPA does, all cast to the autocast dtype."""
    q, k, v = _qkv(Hq=4, Hkv=2, L=24, S=24)
    q.requires_grad_(), k.requires_grad_()
    v16 = v.bfloat16().requires_grad_()
    bm = create_block_mask(causal, None, None, 24, 24, device="cpu", BLOCK_SIZE=8)
    kw = dict(block_mask=bm, enable_gqa=True, kernel_options=OPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = flex_attention(q, k, v16, return_lse=True, **kw)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v16))
    expect, expect_lse = flex_attention(q2.bfloat16(), k2.bfloat16(), v2, return_lse=True, **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(out, expect) and torch.equal(lse, expect_lse)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    (out * g).sum().backward()
    (expect * g).sum().backward()
    assert q.grad.dtype == torch.float32 and v16.grad.dtype == torch.bfloat16
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (v16.grad, v2.grad)):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="share one dtype"):  # outside autocast: an error
        flex_attention(q, k, v16, **kw)


def test_autocast_under_torch_compile():
    """The autocast cast traces (fullgraph) in front of the Triton op (interpreter: fp16)."""
    q, k, v = _qkv(Hq=4, Hkv=2, L=32, S=32)
    bm = create_block_mask(causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)

    def fn(q, k, v):
        with torch.autocast("cpu", dtype=torch.float16):
            return flex_attention(q, k, v.half(), block_mask=bm, enable_gqa=True,
                                  kernel_options={"backend": "triton"})

    expect = fn(q, k, v)
    got = torch.compile(fn, backend="eager", fullgraph=True)(q, k, v)
    assert got.dtype == torch.float16 and torch.equal(got, expect)
    q64, k64, v64 = (t.half().double() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q64, k64, v64, is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-3)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(query=torch.randn(2, 8, 16)), ValueError, "query must have 4 dimensions"),
        (dict(key=[1, 2]), TypeError, "key must be a torch.Tensor"),
        (dict(key=torch.randn(2, 2, 20, 16)), ValueError, "batch sizes differ"),
        (dict(value=torch.randn(1, 2, 21, 16)), ValueError, "key has sequence length 20"),
        (dict(key=torch.randn(1, 2, 20, 8)), ValueError, "query head dim 16"),
        (dict(value=torch.randn(1, 1, 20, 16)), ValueError, "key has 2 heads but value has 1"),
        (dict(value=torch.randn(1, 2, 20, 16, dtype=torch.float64)), TypeError, "share one dtype"),
        (dict(query=torch.randn(1, 2, 20, 16).int()), TypeError, "query must be float16"),
        (dict(scale="x"), TypeError, "scale must be a float"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(kernel_options=[1]), TypeError, "kernel_options must be a dict"),
        (dict(kernel_options={"BLOCKM": 64}), ValueError, "unknown kernel_options"),
        (dict(kernel_options={"backend": "cuda"}), ValueError, 'kernel_options["backend"]'),
        (dict(score_mod=lambda s, b, h: s), TypeError, "score_mod must take 5"),
        (dict(score_mod=3), TypeError, "score_mod must be callable"),
        (dict(block_mask="causal"), TypeError, "block_mask must be a BlockMask"),
    ],
)
def test_bad_input(kwargs, exc, words):
    q, k, v = _qkv()
    args = dict(query=q, key=k, value=v, kernel_options=OPTS)
    args.update(kwargs)
    with pytest.raises(exc) as err:
        flex_attention(**args)
    assert words in str(err.value)


def test_gqa_errors():
    q, k, v = _qkv(Hq=4, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        flex_attention(q, k, v, kernel_options=OPTS)
    q, k, v = _qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flex_attention(q, k, v, enable_gqa=True, kernel_options=OPTS)


def test_block_mask_errors():
    q, k, v = _qkv(B=2, Hq=2, L=20, S=20)
    bm = create_block_mask(causal, None, None, 32, 20, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match=r"built for \(Q_LEN, KV_LEN\) = \(32, 20\)"):
        flex_attention(q, k, v, block_mask=bm, kernel_options=OPTS)
    bm = create_block_mask(causal, 3, None, 20, 20, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="batch size 3 must be 1"):
        flex_attention(q, k, v, block_mask=bm, kernel_options=OPTS)
    bm = create_block_mask(causal, None, 5, 20, 20, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="head count 5"):
        flex_attention(q, k, v, block_mask=bm, kernel_options=OPTS)
    bm = create_block_mask(causal, None, None, 20, 20, device="meta", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="block_mask is on meta"):
        flex_attention(q, k, v, block_mask=bm, kernel_options=OPTS)


def test_mask_mod_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="mask_mod must take 4"):
        create_block_mask(lambda b, h, q: q, 1, 1, 20, 20, device="cpu")
    with pytest.raises(TypeError, match="mask_mod must return a bool"):
        create_block_mask(lambda b, h, q, kv: q - kv, 1, 1, 20, 20, device="cpu")


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("HF_FLEXATTN_BACKEND", raising=False)
    assert resolve_backend(cpu) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("HF_FLEXATTN_BACKEND", "torch")
    assert resolve_backend(torch.device("cuda")) == "torch"
    assert resolve_backend(cpu, {"backend": "auto"}) == "torch"
    monkeypatch.setenv("HF_FLEXATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="HF_FLEXATTN_BACKEND must be one of"):
        resolve_backend(cpu)
    monkeypatch.delenv("HF_FLEXATTN_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend(cpu, {"backend": "triton"})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(cpu, {"backend": "triton"}) == "triton"


def test_cli_version_and_info():
    out = subprocess.run(
        [sys.executable, "-m", "hf_flexattn", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == f"hf-flexattn {hf_flexattn.__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "hf_flexattn", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    import json

    info = json.loads(out)
    assert info["torch"] == torch.__version__ and info["backend"] in ("torch", "triton")


def test_public_names_match_torch():
    import inspect

    for name in ("flex_attention", "create_block_mask", "create_mask", "and_masks", "or_masks"):
        ours = inspect.signature(getattr(hf_flexattn, name))
        theirs = inspect.signature(getattr(torch_fa, name))
        common = [p for p in theirs.parameters if not p.startswith("_")]
        for p in list(ours.parameters)[: len(common)]:
            assert p in theirs.parameters, (name, p)
    assert issubclass(hf_flexattn.BlockMask, torch_fa.BlockMask)
