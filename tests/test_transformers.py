"""Transformers integration: tiny models from configs, "flex" against the reference kernels.

Every model is 2 layers, hidden 64, vocab 128, fp32. The reference is ``eager`` (``sdpa`` for
Falcon, whose eager ALiBi path adds the bias twice). Masks are built with a small tile size so
that the block algebra (full / partial / empty tiles) is exercised.

By default everything runs on the CPU with the torch backend, and ``test_*_triton`` run a
subset through the Triton kernels (in Triton's interpreter on a CPU-only machine). On the GPU
machine run the whole file on CUDA with the Triton backend::

    HF_FLEXATTN_TEST_DEVICE=cuda HF_FLEXATTN_BACKEND=triton pytest tests/test_transformers.py
"""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

import hf_flexattn  # noqa: E402
from hf_flexattn.integrations import transformers as integ  # noqa: E402

MODELS = [
    "llama",
    "mistral",
    "qwen2",
    "gemma2",
    "gpt_oss",
    "phi3",
    "gpt2",
    "bloom",
    "falcon",
    "mpt",
]
DEVICE = torch.device(os.environ.get("HF_FLEXATTN_TEST_DEVICE", "cpu"))
# packed rows: position_ids restarting at 0 (Bloom and MPT take them through the patches'
# model-level wrappers; their forwards do not declare position_ids)
PACKABLE = ["llama", "mistral", "qwen2", "gemma2", "gpt_oss", "phi3", "gpt2", "bloom",
            "falcon", "mpt"]


def tiny_config(model_type: str):
    common = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    attn = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    if model_type == "llama":
        cfg = dict(attn)
    elif model_type == "mistral":
        cfg = dict(attn, sliding_window=5, num_key_value_heads=1)
    elif model_type == "qwen2":
        cfg = dict(
            attn,
            sliding_window=5,
            use_sliding_window=True,
            max_window_layers=0,
            layer_types=["sliding_attention", "full_attention"],
        )
    elif model_type == "gemma2":
        cfg = dict(
            attn,
            sliding_window=5,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=20,
        )
    elif model_type == "gpt_oss":
        cfg = dict(
            attn, intermediate_size=32, sliding_window=5, num_local_experts=4, num_experts_per_tok=2
        )
    elif model_type == "phi3":
        cfg = dict(attn)
        cfg.pop("head_dim")
    elif model_type == "gpt2":
        cfg = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)
    elif model_type == "bloom":
        cfg = dict(hidden_size=64, n_layer=2, n_head=4)
    elif model_type == "falcon":
        cfg = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            alibi=True,
            new_decoder_architecture=False,
            multi_query=False,
        )
    elif model_type == "mpt":
        cfg = dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    else:  # pragma: no cover
        raise ValueError(model_type)
    config = AutoConfig.for_model(model_type, **cfg, **common)
    for attr in (
        "attention_dropout",
        "attn_pdrop",
        "resid_pdrop",
        "embd_pdrop",
        "hidden_dropout",
        "summary_first_dropout",
    ):
        if hasattr(config, attr):
            setattr(config, attr, 0.0)
    if model_type == "mpt":
        config.attn_config.attn_pdrop = 0
    return config


def reference_impl(model_type: str) -> str:
    return "sdpa" if model_type == "falcon" else "eager"


def make_pair(model_type: str, seed: int = 0, layers: int | None = None,
              auto=AutoModelForCausalLM, **config_kw):
    """(reference model, flex model) of the ``auto`` class with the same weights; ``layers``:
    more layers than the tiny config's 2 (``layer_types`` repeated); ``config_kw``: config
    attributes to set."""
    config = tiny_config(model_type)
    for name, value in config_kw.items():
        setattr(config, name, value)
    if layers is not None:
        kinds = getattr(config, "layer_types", None)
        config.num_hidden_layers = layers
        if kinds:
            config.layer_types = [kinds[i % len(kinds)] for i in range(layers)]
    torch.manual_seed(seed)
    ref = auto.from_config(copy.deepcopy(config), attn_implementation=reference_impl(model_type))
    flex = auto.from_config(copy.deepcopy(config), attn_implementation="flex")
    flex.load_state_dict(ref.state_dict())
    assert flex.config._attn_implementation == "flex"
    return ref.eval().to(DEVICE), flex.eval().to(DEVICE)


def _triton_selected() -> bool:
    return os.environ.get("HF_FLEXATTN_BACKEND", "auto") == "triton" or DEVICE.type == "cuda"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # the Triton kernels need tiles that are multiples of 16
    monkeypatch.setattr(integ, "BLOCK_SIZE", 16 if _triton_selected() else 8)
    integ.clear_cache()
    yield
    integ.clear_cache()


@pytest.fixture
def triton_backend(monkeypatch):
    """Run the flex models through the Triton kernels (interpreter without a GPU)."""
    monkeypatch.setenv("HF_FLEXATTN_BACKEND", "triton")
    monkeypatch.setattr(integ, "BLOCK_SIZE", 16)
    integ.clear_cache()


def left_padded_batch(seed: int = 1, length: int = 21):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, length), generator=g)
    am = torch.ones_like(ids)
    am[1, :6] = 0
    am[2, :13] = 0
    ids = ids.masked_fill(am == 0, 0)
    return ids.to(DEVICE), am.to(DEVICE)


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
def test_register_is_idempotent_and_fills_both_interfaces():
    hf_flexattn.register()
    hf_flexattn.register("flex")
    assert transformers.AttentionInterface._global_mapping["flex"] is integ.flex_attention_forward
    assert mu.AttentionMaskInterface._global_mapping["flex"] is integ.flex_mask


def test_register_other_name_and_unregister():
    integ.register("flex_test_name")
    try:
        model = AutoModelForCausalLM.from_config(
            tiny_config("llama"), attn_implementation="flex_test_name"
        )
        assert model.config._attn_implementation == "flex_test_name"
    finally:
        integ.unregister("flex_test_name")
    assert "flex_test_name" not in transformers.AttentionInterface._global_mapping
    assert "flex_test_name" not in mu.AttentionMaskInterface._global_mapping
    from transformers.models.falcon import modeling_falcon as mf

    assert "flex_test_name" not in mf.FALCON_ATTENTION_CLASSES
    assert "flex" in mf.FALCON_ATTENTION_CLASSES
    hf_flexattn.register()  # unregister reverted the shared family patches


def test_set_attn_implementation_switches_to_flex():
    ref, _ = make_pair("llama")
    ids, am = left_padded_batch()
    with torch.no_grad():
        expect = ref(ids, attention_mask=am).logits
        ref.set_attn_implementation("flex")
        assert ref.config._attn_implementation == "flex"
        got = ref(ids, attention_mask=am).logits
    valid = am.bool()
    torch.testing.assert_close(got[valid], expect[valid], atol=2e-4, rtol=0)


def test_bad_mask_arguments_raise():
    with pytest.raises(ValueError, match="q_length"):
        integ.flex_mask(1, 0, 4)
    with pytest.raises(ValueError, match="attention_mask"):
        integ.flex_mask(1, 4, 4, attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(TypeError, match="mask_function"):
        integ.flex_mask(1, 4, 4, mask_function=3)


# --------------------------------------------------------------------------------------------
# the mask function against Transformers' own dense masks
# --------------------------------------------------------------------------------------------
def dense_from_block_mask(bm, B: int, Lq: int, Lk: int) -> torch.Tensor:
    """Expand a BlockMask (tile map + mask_mod) to a bool [B, Lq, Lk] mask."""
    from hf_flexattn._mod_eval import eval_mask_mod

    bq, bk = bm.BLOCK_SIZE
    out = torch.zeros(B, Lq, Lk, dtype=torch.bool)
    mb = bm.kv_num_blocks.shape[0]
    for b in range(B):
        bb = b if mb > 1 else 0
        for i in range(-(-Lq // bq)):
            rows = torch.arange(i * bq, min((i + 1) * bq, Lq))
            lists = [(bm.kv_num_blocks, bm.kv_indices, True)]
            if bm.full_kv_num_blocks is not None:
                lists.append((bm.full_kv_num_blocks, bm.full_kv_indices, False))
            for num, idx, partial in lists:
                for j in idx[bb, 0, i, : int(num[bb, 0, i])].tolist():
                    cols = torch.arange(j * bk, min((j + 1) * bk, Lk))
                    if partial:
                        m = eval_mask_mod(
                            bm.mask_mod, torch.tensor([b]), torch.tensor([0]), rows, cols
                        )[0, 0]
                    else:
                        m = torch.ones(len(rows), len(cols), dtype=torch.bool)
                    out[b, rows[:, None], cols[None, :]] = m
    return out


def _padding(B: int, S: int, lefts: list[int]) -> torch.Tensor:
    am = torch.ones(B, S, dtype=torch.bool)
    for b, n in enumerate(lefts):
        am[b, :n] = False
    return am


MASK_CASES = {
    "causal": dict(B=2, q=19, kv=19, qo=0, ko=0, fn=mu.causal_mask_function, pad=None),
    "causal_left_pad": dict(
        B=3, q=19, kv=19, qo=0, ko=0, fn=mu.causal_mask_function, pad=[0, 5, 11]
    ),
    "causal_decode": dict(B=3, q=1, kv=30, qo=29, ko=0, fn=mu.causal_mask_function, pad=[0, 5, 17]),
    "causal_chunk_prefill": dict(
        B=2, q=7, kv=30, qo=23, ko=0, fn=mu.causal_mask_function, pad=[2, 9]
    ),
    "static_decode": dict(
        B=2,
        q=1,
        kv=40,
        qo=torch.tensor(25),
        ko=0,
        fn=mu.causal_mask_function,
        pad=[3, 0],
        pad_len=26,
    ),
    "static_prefill": dict(
        B=2,
        q=17,
        kv=40,
        qo=torch.tensor(0),
        ko=0,
        fn=mu.causal_mask_function,
        pad=[3, 0],
        pad_len=17,
    ),
    "sliding": dict(
        B=2, q=23, kv=23, qo=0, ko=0, fn=mu.sliding_window_causal_mask_function(5), pad=[0, 7]
    ),
    "sliding_cache_offset": dict(
        B=2,
        q=3,
        kv=7,
        qo=20,
        ko=16,
        fn=mu.sliding_window_causal_mask_function(5),
        pad=[0, 18],
        pad_len=23,
    ),
    "bidirectional": dict(
        B=2, q=11, kv=11, qo=0, ko=0, fn=mu.bidirectional_mask_function, pad=[0, 4]
    ),
    "custom_or": dict(
        B=2,
        q=13,
        kv=13,
        qo=0,
        ko=0,
        fn=mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv < 3),
        pad=[0, 2],
    ),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mask_function_matches_transformers_dense_mask(case):
    c = MASK_CASES[case]
    pad = None
    if c["pad"] is not None:
        pad = _padding(c["B"], c.get("pad_len", int(c["qo"]) + c["q"]), c["pad"])
    kwargs = dict(
        batch_size=c["B"],
        q_length=c["q"],
        kv_length=c["kv"],
        q_offset=c["qo"],
        kv_offset=c["ko"],
        mask_function=c["fn"],
        attention_mask=pad,
    )
    expect = mu.sdpa_mask(**kwargs, allow_is_causal_skip=False, use_vmap=True)
    expect = expect.expand(c["B"], 1, c["q"], c["kv"])[:, 0]
    bm = integ.flex_mask(**kwargs, device="cpu")
    assert isinstance(bm, torch.nn.attention.flex_attention.BlockMask)
    assert isinstance(bm, hf_flexattn.BlockMask)
    got = dense_from_block_mask(bm, c["B"], c["q"], c["kv"])
    # rows that see nothing are left to the kernel (output 0), Transformers' too
    assert torch.equal(got, expect)


def test_packed_mask_function_matches_transformers():
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1]])
    docs = mu.find_packed_sequence_indices(pos)
    fn = mu.and_masks(
        mu.sliding_window_causal_mask_function(4), mu.packed_sequence_mask_function(docs)
    )
    if hasattr(mu, "remap_positions_for_packed_sequence"):
        fn = mu.and_masks(
            mu.remap_positions_for_packed_sequence(mu.sliding_window_causal_mask_function(4), pos),
            mu.packed_sequence_mask_function(docs),
        )
    L = pos.shape[1]
    expect = mu.sdpa_mask(1, L, L, mask_function=fn, allow_is_causal_skip=False, use_vmap=True)[
        :, 0
    ]
    bm = integ.flex_mask(1, L, L, mask_function=fn)
    assert torch.equal(dense_from_block_mask(bm, 1, L, L), expect)
    # analytic tile map: tiles outside every window are skipped (3x3 tiles, 5 visited)
    if integ.BLOCK_SIZE == 8:
        assert int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum()) == 5


def test_mask_is_cached_and_skips_tiles():
    a = integ.flex_mask(2, 40, 40)
    b = integ.flex_mask(2, 40, 40)
    assert a is b
    # causal 40x40 with T-wide tiles: n = ceil(40 / T) diagonal partial tiles (the ragged
    # last one included) and n (n - 1) / 2 full tiles below them
    n = -(-40 // integ.BLOCK_SIZE)
    assert int(a.kv_num_blocks.sum()) == n
    assert int(a.full_kv_num_blocks.sum()) == n * (n - 1) // 2


# --------------------------------------------------------------------------------------------
# decoding: the one q-tile fast path against the general block algebra
# --------------------------------------------------------------------------------------------
def _dense_tiles(bm, B: int, Lq: int, Lk: int) -> torch.Tensor:
    """Bool ``[B, Lq, Lk]`` of a BlockMask: full tiles, and mask_mod on partial tiles (what
    the kernels compute), vectorised. Also checks the index layout."""
    from hf_flexattn._mod_eval import eval_mask_mod
    from hf_flexattn.block_mask import _ordered_to_dense

    bq, bk = bm.BLOCK_SIZE
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    lists = [(bm.kv_num_blocks, bm.kv_indices)]
    if bm.full_kv_num_blocks is not None:
        lists.append((bm.full_kv_num_blocks, bm.full_kv_indices))
    tables = []
    for num, idx in lists:
        assert num.dtype == idx.dtype == torch.int32
        assert idx.shape[-2:] == (nq, nk) and num.shape[-1] == nq
        # every index row is a permutation of the kv-blocks, listed ones first (torch's layout)
        assert torch.equal(idx.sort(-1).values, torch.arange(nk, dtype=torch.int32).expand_as(idx))
        assert bool(((num >= 0) & (num <= nk)).all())
        tables.append(_ordered_to_dense(num, idx, nk).bool())
    part = tables[0]
    full = tables[1] if len(tables) > 1 else torch.zeros_like(part)
    assert not bool((part & full).any()), "a tile is both partial and full"

    def expand(t: torch.Tensor) -> torch.Tensor:
        t = t.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :Lq, :Lk]
        return t[:, 0].expand(B, Lq, Lk)

    mm = eval_mask_mod(
        bm.mask_mod, torch.arange(B), torch.arange(1), torch.arange(Lq), torch.arange(Lk)
    )[:, 0].expand(B, Lq, Lk)
    return expand(full) | (expand(part) & mm)


def _decode_cases():
    for q_length in (1, 2, 5, "block"):
        for kv_length in (1, 7, 8, 9, 33, 64, 100):
            for kv_offset in (0, 5):
                for padded in (False, True):
                    yield q_length, kv_length, kv_offset, padded


@pytest.mark.parametrize("window", [None, 3, 20])
@pytest.mark.parametrize("block", [8, 16])
def test_one_q_tile_fast_path_equals_general_path(monkeypatch, block, window):
    monkeypatch.setattr(integ, "BLOCK_SIZE", block)
    calls = []
    fast_builder = integ._build_one_q_tile

    def counting(*args, **kwargs):
        calls.append(1)
        return fast_builder(*args, **kwargs)

    monkeypatch.setattr(integ, "_build_one_q_tile", counting)
    fn = (
        mu.causal_mask_function
        if window is None
        else mu.sliding_window_causal_mask_function(window)
    )
    B = 3
    n_checked = 0
    for q_length, kv_length, kv_offset, padded in _decode_cases():
        q_length = block if q_length == "block" else q_length
        end = kv_offset + kv_length  # absolute end of the cache
        offsets = {end - q_length, end + 3, 0, kv_offset - 3}
        pad = _padding(B, end, [0, min(3, end), min(11, end)]) if padded else None
        for q_offset in sorted(offsets):
            args = (B, q_length, kv_length, q_offset, kv_offset, fn)
            with torch.no_grad():
                integ.clear_cache()
                monkeypatch.setattr(integ, "_ONE_Q_TILE_FAST_PATH", False)
                general = integ.flex_mask(*args, attention_mask=pad, device="cpu")
                integ.clear_cache()
                monkeypatch.setattr(integ, "_ONE_Q_TILE_FAST_PATH", True)
                before = len(calls)
                fast = integ.flex_mask(*args, attention_mask=pad, device="cpu")
            case = (q_length, kv_length, q_offset, kv_offset, window, padded)
            assert len(calls) == before + 1, f"fast path not taken for {case}"
            assert fast.kv_num_blocks.shape == (1, 1, 1) and fast.q_indices is None
            assert general.kv_num_blocks.shape[1:] == (1, 1)
            assert fast.mask_mod.__name__ == general.mask_mod.__name__
            got = _dense_tiles(fast, B, q_length, kv_length)
            expect = _dense_tiles(general, B, q_length, kv_length)
            assert torch.equal(got, expect), case
            # and both equal the mask written out from positions
            q = torch.arange(q_length)[:, None] + q_offset
            kv = torch.arange(kv_length)[None, :] + kv_offset
            ref = kv <= q
            if window is not None:
                ref = ref & (kv > q - window)
            ref = ref.expand(B, -1, -1)
            if pad is not None:
                ref = ref & pad[:, None, kv_offset:end]
            assert torch.equal(got, ref), case
            info = integ.get_mask_info(fast)
            assert info.q_offset == q_offset and info.kv_length == kv_length
            assert (info.padding is None) == (pad is None)
            if pad is None:
                # same visible tiles; the full ones kept unless partial tiles lie on both sides
                from hf_flexattn.block_mask import _ordered_to_dense

                def status(bm):
                    nk = bm.kv_indices.shape[-1]
                    p = _ordered_to_dense(bm.kv_num_blocks, bm.kv_indices, nk)[0, 0, 0].bool()
                    f = _ordered_to_dense(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
                    return p, f[0, 0, 0].bool()

                fp, ff = status(fast)
                gp, gf = status(general)
                assert torch.equal(fp | ff, gp | gf), case
                split = gp.nonzero().flatten()
                if len(split) == 0 or int(split[-1] - split[0]) + 1 == len(split):
                    assert torch.equal(ff, gf), case
            n_checked += 1
    assert n_checked > 200


def test_one_q_tile_fast_path_launches_almost_nothing():
    """A decoding step's mask launches nothing: the padding mask is read as it is, the offset
    is a view of a cached bank, the tile lists are views of a cached buffer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    views = {"alias", "as_strided", "view", "slice", "expand", "unsqueeze", "detach"}
    fn = mu.causal_mask_function
    with torch.no_grad():
        n = 10 * integ.BLOCK_SIZE + 2
        integ.flex_mask(4, 1, n, n - 1, 0, fn, attention_mask=torch.ones(4, n, dtype=torch.long))
        integ.flex_mask(4, 1, n, n - 1, 0, fn)
        for padded in (True, False):
            n += 1  # next step: same number of kv-tiles, new length and offset
            am = torch.ones(4, n, dtype=torch.long) if padded else None
            with Record() as rec:
                bm = integ.flex_mask(4, 1, n, n - 1, 0, fn, attention_mask=am)
            ops = [op for op in rec.ops if op not in views]
            assert ops == [], rec.ops
            assert bm.kv_num_blocks.shape == (1, 1, 1)
        # a padding mask shorter than the keys, or a float one, is converted (and padded)
        for am in (torch.ones(4, n - 3, dtype=torch.long), torch.ones(4, n + 1)):
            n += 1
            with Record() as rec:
                bm = integ.flex_mask(4, 1, n, n - 1, 0, fn, attention_mask=am[:, :n])
            assert "_to_copy" in rec.ops, rec.ops
    # training (autograd on) and static caches (tensor offsets) keep the general path
    with torch.enable_grad():
        bm = integ.flex_mask(2, 1, 30, 29, 0, fn)
    assert bm.q_indices is not None
    with torch.no_grad():
        am = _padding(2, 30, [0, 4])
        bm = integ.flex_mask(2, 1, 30, torch.tensor(29), 0, fn, attention_mask=am)
    assert bm.kv_num_blocks.shape[0] == 2


def test_masks_built_during_graph_capture_are_not_cached(monkeypatch):
    """Memory allocated while a CUDA graph is captured belongs to the graph's pool: masks,
    offset scalars and index buffers made then must not enter the caches that later calls
    reuse (here the capture state is simulated; the values still match)."""
    fn = mu.causal_mask_function
    integ.clear_cache()
    for cache in (integ._OFFSETS, integ._INDEX_BUFFERS, integ._TILE_PROTOS):
        cache.clear()
    monkeypatch.setattr(integ, "_capturing", lambda device: True)
    n = 3 * integ.BLOCK_SIZE + 5
    am = _padding(2, n, [0, 4])
    with torch.no_grad():
        fast = integ.flex_mask(2, 1, n, n - 1, 0, fn, attention_mask=am)  # one q tile
        general = integ.flex_mask(2, 7, n, n - 7, 0, fn, attention_mask=am[:, :n])
        other = integ.flex_mask(2, 30, 30, 0, 0, fn)  # the general path, cacheable otherwise
    assert not integ._mask_cache and not integ._OFFSETS
    assert not integ._INDEX_BUFFERS and not integ._TILE_PROTOS
    monkeypatch.setattr(integ, "_capturing", lambda device: False)
    with torch.no_grad():
        for bm, (lq, off) in ((fast, (1, n - 1)), (general, (7, n - 7))):
            want = integ.flex_mask(2, lq, n, off, 0, fn, attention_mask=am)
            assert torch.equal(_dense_tiles(bm, 2, lq, n), _dense_tiles(want, 2, lq, n))
        want = integ.flex_mask(2, 30, 30, 0, 0, fn)
        assert torch.equal(_dense_tiles(other, 2, 30, 30), _dense_tiles(want, 2, 30, 30))


@pytest.mark.cuda
def test_cuda_mask_for_a_device_without_index():
    """``device="cuda"`` means the current device: the decoding step's cached views live there."""
    fn = mu.causal_mask_function
    with torch.no_grad():
        bm = integ.flex_mask(2, 1, 300, 299, 0, fn, device="cuda")
    cur = torch.device("cuda", torch.cuda.current_device())
    assert bm.kv_num_blocks.device == cur and bm.kv_indices.device == cur
    shift = bm.mask_mod._hf_flexattn_family[1][0]
    assert shift.device == cur and int(shift) == 299


def test_traced_mask_function_leaves_the_caches_alone():
    """Under torch.compile (Transformers compiles static-cache decoding) the mask function is
    traced: a cached mask would enter the graph as a constant, and masks made in the graph
    are graph values, so the traced code neither reads nor fills the Python-side caches."""
    fn = mu.causal_mask_function
    integ.clear_cache()
    integ._OFFSETS.clear()

    def f(q_off):
        bm = integ.flex_mask(2, 4, 30, q_off, 0, fn, attention_mask=_padding(2, 30, [0, 3]))
        return bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(f, backend="eager")(torch.tensor(26))
    finally:
        torch._dynamo.reset()
    assert not integ._mask_cache and not integ._OFFSETS
    with torch.no_grad():
        assert int(got) == int(f(torch.tensor(26)))


def test_mask_under_inference_mode():
    """Inference tensors have no version counter: such masks are built, just not cached."""
    fn = mu.causal_mask_function
    with torch.no_grad():
        expect = _dense_tiles(
            integ.flex_mask(2, 1, 30, 29, 0, fn, attention_mask=_padding(2, 30, [0, 4])), 2, 1, 30
        )
    with torch.inference_mode():
        am = _padding(2, 30, [0, 4])
        a = integ.flex_mask(2, 1, 30, 29, 0, fn, attention_mask=am)
        b = integ.flex_mask(2, 1, 30, 29, 0, fn, attention_mask=am)
    assert a is not b
    assert torch.equal(_dense_tiles(a, 2, 1, 30), expect)


# --------------------------------------------------------------------------------------------
# models: logits, gradients, generation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODELS)
def test_left_padded_logits_and_gradients(model_type):
    _check_logits_and_gradients(model_type)


TRITON_SUBSET = ["llama", "gemma2", "gpt_oss", "bloom"]


@pytest.mark.interpreter
@pytest.mark.parametrize("model_type", TRITON_SUBSET)
def test_left_padded_logits_and_gradients_triton(model_type, triton_backend):
    _check_logits_and_gradients(model_type)


@pytest.mark.interpreter
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_greedy_generate_triton(model_type, triton_backend):
    _check_generate(model_type, "dynamic")


@pytest.mark.interpreter
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_long_prompt_generate_triton_runs_decode_plans(model_type, triton_backend, monkeypatch):
    """A long prompt (260 tokens, past the split-KV kernel's old 256-key threshold): every
    decoding step's first layer builds its plan from the last step's template, the later
    layers run it (the attention function's fast lane), and the tokens equal the
    reference's."""
    from hf_flexattn.kernels import flex_decode

    from hf_flexattn.backends import triton_backend as tb

    ref, flex = make_pair(model_type, seed=3)
    assert tb.DECODE_MIN_S <= 260
    ids, am = left_padded_batch(seed=5, length=260)
    n_new = 4
    used = {"plan": 0, "template": 0}
    plan_call, from_template = flex_decode.DecodePlan.__call__, tb._plan_from_template

    def count_plan(self, *a, **k):
        used["plan"] += 1
        return plan_call(self, *a, **k)

    def count_template(*a, **k):
        plan = from_template(*a, **k)
        used["template"] += plan is not None
        return plan

    monkeypatch.setattr(flex_decode.DecodePlan, "__call__", count_plan)
    monkeypatch.setattr(tb, "_plan_from_template", count_template)
    kw = dict(attention_mask=am, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    expect = ref.generate(ids, **kw)
    got = flex.generate(ids, **kw)
    assert torch.equal(got, expect)
    # layers with the whole cache (sliding layers keep a window: too short to split)
    kinds = getattr(ref.config, "layer_types", None) or ["full_attention"] * len(ref.model.layers)
    full = sum(k == "full_attention" for k in kinds)
    # decoding steps 2.. (the first one stores the plans and templates)
    assert used["template"] >= n_new - 2, used
    assert used["plan"] >= (n_new - 2) * full, used


@pytest.mark.interpreter
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_prompt_layers_after_the_first_run_the_stored_forward_plan(
    model_type, triton_backend, prepare_calls
):
    """A forward pass without gradients (a prompt): the first call per BlockMask prepares the
    kernel and stores a plan on the mask, which every layer shares, and the later layers run
    the plan (gemma2: a sliding and a global mask, softcap). Logits equal the reference's."""
    ref, flex = make_pair(model_type, seed=3, layers=4)
    ids, am = left_padded_batch(seed=5)
    n = prepare_calls
    layers = flex.config.num_hidden_layers
    masks = 2 if model_type == "gemma2" else 1
    with torch.no_grad():
        expect = ref(ids, attention_mask=am).logits
        got = flex(ids, attention_mask=am).logits
        assert n["prepare"] == masks < layers
        again = flex(ids, attention_mask=am).logits  # a second pass: the same logits
    valid = am.bool()
    torch.testing.assert_close(got[valid], expect[valid], atol=2e-4, rtol=0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


@pytest.mark.interpreter
def test_packed_position_ids_triton(triton_backend):
    _check_packed("qwen2")


def _check_logits_and_gradients(model_type):
    ref, flex = make_pair(model_type)
    ids, am = left_padded_batch()
    valid = am.bool()
    with torch.no_grad():
        expect = ref(ids, attention_mask=am).logits
        got = flex(ids, attention_mask=am).logits
    torch.testing.assert_close(got[valid], expect[valid], atol=2e-4, rtol=0)

    # a padding position's output is a convention (eager: mean of all values, flex: 0); keep
    # it out of the loss, including as the predictor of the first real token
    labels = ids.masked_fill(am == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(am[:, :-1] == 0, -100)
    grads = []
    for model in (ref, flex):
        model.train()
        model.zero_grad()
        model(ids, attention_mask=am, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.eval()
    assert grads[0].keys() == grads[1].keys()
    for name, g_ref in grads[0].items():
        scale = g_ref.abs().max().clamp_min(1e-6)
        err = (grads[1][name] - g_ref).abs().max() / scale
        assert err <= 1e-3, f"{model_type} {name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt_oss"])
def test_bf16_autocast_with_fp32_weights(model_type):
    """Accelerate's mixed_precision="bf16": fp32 weights under bf16 autocast, where rotary
    embeddings hand the attention fp32 q/k and a bf16 v. Logits and loss gradients are as
    close to the fp32 model (without autocast; its error is ~1e-6, bf16's ~1e-2) as the
    reference implementation's under the same autocast."""
    if DEVICE.type != "cpu":
        pytest.skip("CPU autocast (bf16 in the Triton interpreter is not exact)")
    ref, flex = make_pair(model_type)
    exact = copy.deepcopy(ref)
    ids, am = left_padded_batch()
    valid = am.bool()
    labels = ids.masked_fill(am == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(am[:, :-1] == 0, -100)

    def run(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, attention_mask=am, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach().double()[valid], grads

    want_logits, want_grads = run(exact, False)
    results = {}
    for name, model in (("ref", ref), ("flex", flex)):
        logits, grads = run(model, True)
        assert logits.isfinite().all()
        results[name] = ((logits - want_logits).abs().max(), grads)
    err_ref, err_flex = results["ref"][0], results["flex"][0]
    assert err_flex <= 2 * err_ref + 1e-3, (float(err_flex), float(err_ref))
    for name, g in want_grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        e_ref = (results["ref"][1][name] - g).abs().max() / scale
        e_flex = (results["flex"][1][name] - g).abs().max() / scale
        assert e_flex <= 2 * e_ref + 1e-3, f"{name}: {float(e_flex):.2e} vs {float(e_ref):.2e}"


GENERATE_CASES = [(m, "dynamic") for m in MODELS] + [
    # Falcon's own static-cache path fails in Transformers (its ALiBi needs the 2-D mask);
    # MPT has no static cache support.
    (m, "static")
    for m in MODELS
    if m not in ("falcon", "mpt")
]


@pytest.mark.parametrize("model_type,cache", GENERATE_CASES)
def test_greedy_generate_matches_reference(model_type, cache):
    _check_generate(model_type, cache)


def _check_generate(model_type, cache):
    ref, flex = make_pair(model_type, seed=3)
    ids, am = left_padded_batch(seed=5, length=13)
    kw = dict(attention_mask=am, max_new_tokens=12, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    expect = ref.generate(ids, **kw)
    got = flex.generate(ids, **kw)
    assert torch.equal(got, expect)


# --------------------------------------------------------------------------------------------
# packed rows
# --------------------------------------------------------------------------------------------
DOC_LENGTHS = [7, 12, 4]


def _docs(seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).to(DEVICE) for n in DOC_LENGTHS]


def _separate_logits(model, docs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])


@pytest.mark.parametrize("model_type", PACKABLE)
def test_packed_position_ids_equal_separate_documents(model_type):
    _check_packed(model_type)


def _check_packed(model_type):
    ref, flex = make_pair(model_type)
    docs = _docs()
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d), device=DEVICE) for d in docs])[None]
    expect = _separate_logits(ref, docs)
    with torch.no_grad():
        got = flex(ids, position_ids=pos, use_cache=False).logits[0]
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
def test_patched_packed_rows_under_gradient_checkpointing(model_type):
    # the patches hold packed-row kwargs only while the model call runs; the document mask
    # they build must reach the layers' recomputation in backward too: the loss gradients of
    # the packed row, with and without checkpointing, equal those of the documents run apart
    ref, flex = make_pair(model_type)
    docs = _docs(seed=5)
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d), device=DEVICE) for d in docs])[None]
    labels = torch.cat([torch.cat([d[:1] * 0 - 100, d[1:]]) for d in docs])[None]

    def grads(model, packed):
        model.zero_grad(set_to_none=True)
        if packed:
            model(ids, position_ids=pos, labels=labels, use_cache=False).loss.backward()
        else:  # the same mean over all documents' predicted tokens
            total = sum(len(d) - 1 for d in docs)
            for d in docs:
                out = model(d[None], labels=d[None], use_cache=False)
                (out.loss * (len(d) - 1) / total).backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()
                if p.grad is not None}

    ref.train()
    flex.train()
    expect = grads(ref, False)
    for checkpointing in (False, True):
        if checkpointing:
            flex.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        got = grads(flex, True)
        assert got.keys() == expect.keys()
        for name, g in expect.items():
            err = (got[name] - g).abs().max() / g.abs().max().clamp_min(1e-6)
            assert err <= 1e-3, f"{name} (checkpointing={checkpointing}): {float(err):.2e}"


@pytest.mark.parametrize("model_type", ["bloom", "falcon", "mpt"])
def test_patched_token_classification_head_keeps_packed_rows(model_type):
    # the heads besides the LM head drop packed-row kwargs too: per-token logits of a packed
    # row (cu_seq_lens only) equal those of its documents run apart
    from transformers import AutoModelForTokenClassification

    ref, flex = make_pair(model_type, auto=AutoModelForTokenClassification, num_labels=3)
    docs = _docs(seed=3)
    cu = torch.tensor([0, *itertools.accumulate(len(d) for d in docs)], dtype=torch.int32,
                      device=DEVICE)
    with torch.no_grad():
        expect = torch.cat([ref(d[None]).logits[0] for d in docs])
        got = flex(torch.cat(docs)[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits[0]
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "gpt_oss", "gpt2", "bloom",
                                        "falcon", "mpt"])
def test_flattening_collator_cu_seqlens_equal_separate_documents(model_type):
    from transformers import DataCollatorWithFlattening

    ref, flex = make_pair(model_type)
    docs = _docs(seed=11)
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    batch = collator([{"input_ids": d.tolist()} for d in docs])
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    assert "cu_seq_lens_q" in batch
    batch.pop("labels", None)
    expect = _separate_logits(ref, docs)
    with torch.no_grad():
        got = flex(**batch, use_cache=False).logits[0]
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=0)
    # the same with cu_seq_lens only (position_ids left as a plain arange): still separated
    calls = {}
    orig = integ._document_mask

    def spy(source, kind, *a, **k):
        calls[kind] = calls.get(kind, 0) + 1
        return orig(source, kind, *a, **k)

    integ._document_mask = spy
    try:
        with torch.no_grad():
            flex(
                input_ids=batch["input_ids"],
                cu_seq_lens_q=batch["cu_seq_lens_q"],
                cu_seq_lens_k=batch["cu_seq_lens_k"],
                max_length_q=batch["max_length_q"],
                max_length_k=batch["max_length_k"],
                position_ids=batch["position_ids"],
                use_cache=False,
            )
    finally:
        integ._document_mask = orig
    assert calls.get("cu", 0) >= 1


# --------------------------------------------------------------------------------------------
# misc
# --------------------------------------------------------------------------------------------
def test_save_and_load_keeps_flex(tmp_path):
    ref, flex = make_pair("qwen2")
    flex.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flex")
    loaded = loaded.eval().to(DEVICE)
    assert loaded.config._attn_implementation == "flex"
    ids, am = left_padded_batch()
    with torch.no_grad():
        expect = ref(ids, attention_mask=am).logits
        got = loaded(ids, attention_mask=am).logits
    valid = am.bool()
    torch.testing.assert_close(got[valid], expect[valid], atol=2e-4, rtol=0)


def test_dropout_while_training_is_refused():
    config = tiny_config("llama")
    config.attention_dropout = 0.1
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flex").to(DEVICE)
    ids, am = left_padded_batch()
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(ids, attention_mask=am)
    model.eval()
    model(ids, attention_mask=am)  # dropout is not applied in eval: accepted


# exact fp64 checks on the CPU run on the torch backend, whatever HF_FLEXATTN_BACKEND says
TORCH = {"backend": "torch"}


def test_attention_function_shapes_gqa_and_unknown_kwargs():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 5, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    bm = integ.flex_mask(2, 5, 9, q_offset=4)
    out, weights = integ.flex_attention_forward(
        None, q, k, v, bm, scaling=0.3, something_unknown=1, kernel_options=TORCH
    )
    assert weights is None and out.shape == (2, 5, 6, 8) and out.is_contiguous()
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    s = (q @ kk.transpose(-1, -2)) * 0.3
    allowed = torch.arange(9)[None, :] <= torch.arange(5)[:, None] + 4
    s = s.masked_fill(~allowed, float("-inf"))
    expect = (s.softmax(-1) @ vv).transpose(1, 2)
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=0)


def test_sinks_fold_into_normaliser_with_gradients():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 16, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bm = integ.flex_mask(1, 6, 6)
    out, _ = integ.flex_attention_forward(
        None, q, k, v, bm, scaling=0.25, s_aux=sinks, sliding_window=None, kernel_options=TORCH
    )
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    logits = torch.cat([s, sinks.view(1, 4, 1, 1).expand(1, 4, 6, 1)], -1)
    p = logits.softmax(-1)[..., :-1]
    expect = (p @ v.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=0)
    w = torch.randn_like(expect)
    g1 = torch.autograd.grad((out * w).sum(), (q, k, v, sinks))
    g2 = torch.autograd.grad((expect * w).sum(), (q, k, v, sinks))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_cu_seq_lens_q_and_k_must_agree():
    q = torch.randn(1, 4, 12, 16)
    k = torch.randn(1, 2, 12, 16)
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
    kw = dict(cu_seq_lens_q=cu_q, cu_seq_lens_k=torch.tensor([0, 6, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        integ.flex_attention_forward(None, q, k, k, None, kernel_options=TORCH, **kw)
    # equal contents in distinct tensors (what DataCollatorWithFlattening sends) are fine
    q, k = q.double(), k.double()
    out, _ = integ.flex_attention_forward(
        None, q, k, k, None, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_q.clone(), kernel_options=TORCH
    )
    assert out.shape == (1, 12, 4, 16)
    for a, b in ((0, 5), (5, 12)):  # each document alone, causal
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], k[:, :, a:b], is_causal=True, enable_gqa=True
        )
        torch.testing.assert_close(out[:, a:b], ref.transpose(1, 2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_compiled_static_cache_generate(model_type):
    """Transformers compiles the decoding forward for static caches on GPUs; force that path
    here (dynamo with the aot_eager backend) and compare tokens with the eager reference."""
    from transformers import CompileConfig

    ref, flex = make_pair(model_type, seed=3)
    ids, am = left_padded_batch(seed=5, length=13)
    kw = dict(
        attention_mask=am,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        cache_implementation="static",
    )
    expect = ref.generate(ids, **kw)
    cc = CompileConfig(backend="aot_eager", fullgraph=False)
    cc._compile_all_devices = True
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        got = flex.generate(ids, compile_config=cc, **kw)
        compiled = counters["frames"]["ok"]
    finally:
        torch._dynamo.reset()
    assert compiled > 0, "generate did not compile the forward"
    assert torch.equal(got, expect)
