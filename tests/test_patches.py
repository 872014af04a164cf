"""Family patches (Bloom, Falcon, MPT): registry, exact ALiBi slopes, revert."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.bloom import modeling_bloom as mb  # noqa: E402
from transformers.models.falcon import modeling_falcon as mf  # noqa: E402
from transformers.models.mpt import modeling_mpt as mm  # noqa: E402

import hf_flexattn  # noqa: E402
from hf_flexattn import patches  # noqa: E402
from hf_flexattn.mods import alibi_slopes_bloom as bloom_alibi_slopes  # noqa: E402
from hf_flexattn.mods import alibi_slopes_falcon as falcon_alibi_slopes  # noqa: E402
from hf_flexattn.mods import alibi_slopes_mpt as mpt_alibi_slopes  # noqa: E402


@pytest.fixture(autouse=True)
def reinstall():
    yield
    hf_flexattn.register()  # back to the state `import hf_flexattn` leaves


def _bloom():
    return AutoConfig.for_model("bloom", hidden_size=64, n_layer=2, n_head=4, vocab_size=128)


def _falcon():
    return AutoConfig.for_model(
        "falcon",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        alibi=True,
        vocab_size=128,
        new_decoder_architecture=False,
        multi_query=False,
    )


def test_registry_lists_the_three_families():
    assert sorted(patches.PATCHES) == ["bloom", "falcon", "mpt"]
    for mt in patches.PATCHES:
        assert patches.is_patched(mt)  # installed by `import hf_flexattn`


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16, 24])
def test_bloom_and_falcon_slopes_are_the_models(heads):
    mask = torch.ones(1, 5, dtype=torch.long)
    alibi = mb.build_alibi_tensor(mask, heads, torch.float32).view(heads, 5)
    torch.testing.assert_close(alibi[:, 1], bloom_alibi_slopes(heads), atol=0, rtol=0)
    alibi = mf.build_alibi_tensor(mask, heads, torch.float32).view(heads, 5)
    torch.testing.assert_close(alibi[:, 1], falcon_alibi_slopes(heads), atol=0, rtol=0)


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16, 24])
def test_mpt_slopes_are_the_models(heads):
    alibi = mm.build_mpt_alibi_tensor(heads, 10, alibi_bias_max=8)  # [H, 1, 10]
    torch.testing.assert_close(-alibi[:, 0, -2], mpt_alibi_slopes(heads), atol=0, rtol=0)


def test_revert_restores_originals_and_patched_reapplies():
    wrapped = mb.BloomAttention.forward
    assert hasattr(wrapped, "_hf_flexattn_original")
    patches.revert()
    assert not hasattr(mb.BloomAttention.forward, "_hf_flexattn_original")
    assert not hasattr(mf.FalconAttention.forward, "_hf_flexattn_original")
    assert not hasattr(mf.FalconModel.forward, "_hf_flexattn_original")
    assert not hasattr(mm.MptAttention.forward, "_hf_flexattn_original")
    assert not hasattr(mm.create_causal_mask, "_hf_flexattn_original")
    assert "flex" not in mf.FALCON_ATTENTION_CLASSES
    # unpatched Falcon cannot even be built with the flex implementation
    with pytest.raises(KeyError):
        AutoModelForCausalLM.from_config(_falcon(), attn_implementation="flex")
    with patches.patched("falcon") as patch:
        assert patch.applied and "flex" in mf.FALCON_ATTENTION_CLASSES
        AutoModelForCausalLM.from_config(_falcon(), attn_implementation="flex")
    assert "flex" not in mf.FALCON_ATTENTION_CLASSES
    assert not patches.is_patched("falcon")


def test_apply_patch_accepts_models_and_configs_and_is_idempotent():
    patches.revert()
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(_bloom(), attn_implementation="eager").eval()
    flex = AutoModelForCausalLM.from_config(
        copy.deepcopy(_bloom()), attn_implementation="flex"
    ).eval()
    flex.load_state_dict(ref.state_dict())
    ids = torch.randint(3, 128, (2, 9))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    valid = am.bool()
    with torch.no_grad():
        expect = ref(ids, attention_mask=am).logits
        # unpatched: Bloom's inline attention never sees a usable mask (the bug we fix)
        with pytest.raises(Exception):  # noqa: B017 - whatever the unpatched code raises
            torch.testing.assert_close(
                flex(ids, attention_mask=am).logits[valid], expect[valid], atol=2e-4, rtol=0
            )
        patches.apply_patch(flex)
        patches.apply_patch(flex.config)
        patches.apply_patch("bloom")
        got = flex(ids, attention_mask=am).logits
    torch.testing.assert_close(got[valid], expect[valid], atol=2e-4, rtol=0)
    patches.revert(flex)
    assert not patches.is_patched("bloom")


def test_patched_eager_models_are_untouched():
    """With the patches installed, the other implementations run the original code."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_bloom(), attn_implementation="eager").eval()
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        a = model(ids).logits
        patches.revert()
        b = model(ids).logits
    assert torch.equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="llama"):
        patches.apply_patch("llama")
    with pytest.raises(TypeError, match="model_or_type"):
        patches.apply_patch(3)
    with pytest.raises(ValueError, match="num_heads"):
        bloom_alibi_slopes(0)
    with pytest.raises(ValueError, match="num_heads"):
        mpt_alibi_slopes(0)


def test_dropout_while_training_is_refused():
    config = _bloom()
    config.attention_dropout = 0.1
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flex").train()
    with pytest.raises(ValueError, match="dropout"):
        model(torch.randint(3, 128, (1, 5)))
