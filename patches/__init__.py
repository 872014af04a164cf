"""Revertible patches for model families outside Transformers' attention interface.

Bloom, Falcon (ALiBi or rotary) and MPT compute attention inline instead of calling
``AttentionInterface``: with an unknown implementation name Bloom silently drops its causal
mask and Falcon/MPT crash. A patch here makes such a family run on ``hf_flexattn`` when the
model uses the ``"flex"`` implementation:

* the attention class's ``forward`` is wrapped at class level; the wrapper takes the flex path
  only when it receives a BlockMask (which only the flex mask function produces) and otherwise
  calls the original ``forward`` unchanged;
* ALiBi is a ``score_mod`` built from each family's own slope formula and key positions, never
  a materialised bias;
* family-specific hooks (Falcon: the ``"flex"`` entry in ``FALCON_ATTENTION_CLASSES`` that
  model construction needs, and the model-level ALiBi merge that must be skipped);
* packed rows: these families' model classes drop ``cu_seq_lens_q/k`` (and Bloom and MPT
  ``position_ids``) before attention sees them. The forwards of their model classes (base
  model, LM head, the other heads) are wrapped to hold those kwargs for the call, and the family's
  ``create_causal_mask`` turns its BlockMask into the packed-document mask, so packed
  documents never attend to each other (the mask object then travels to every layer, also
  through gradient checkpointing's recomputation).

``hf_flexattn.register()`` installs all patches (``install_auto``); they stay inert for every
other implementation. Everything is undoable::

    from hf_flexattn import patches
    patches.apply_patch("bloom")      # or a model / config; idempotent
    patches.revert("bloom")           # or patches.revert() for all
    with patches.patched("falcon"):
        ...
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = [
    "PATCHES",
    "FamilyPatch",
    "apply_patch",
    "install_auto",
    "is_patched",
    "patched",
    "revert",
    "uninstall_auto",
]

logger = logging.getLogger(__name__)


class FamilyPatch:
    """A set of revertible attribute replacements for one ``model_type``.

    Subclasses implement :meth:`_targets`, returning ``(owner, attribute, new_value)`` triples;
    :meth:`apply` saves the originals and :meth:`revert` restores them exactly.
    """

    model_type: str = ""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, bool, Any]] = []
        self.names: set[str] = set()  # attention implementation names served by this patch

    @property
    def applied(self) -> bool:
        return bool(self._saved)

    def _targets(self) -> list[tuple[Any, str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_apply(self) -> None:
        """Hook for state that depends on :attr:`names` (e.g. class-map entries)."""

    def _extra_revert(self) -> None:
        """Undo :meth:`_extra_apply`."""

    def apply(self, name: str = "flex") -> None:
        """Apply (idempotent); ``name`` is the attention implementation to serve."""
        self.names.add(name)
        if not self._saved:
            for owner, attr, new in self._targets():
                had = attr in vars(owner)
                old = vars(owner).get(attr)
                self._saved.append((owner, attr, had, old))
                setattr(owner, attr, new)
            logger.debug("applied hf_flexattn patch for %s", self.model_type)
        self._extra_apply()

    def forget(self, name: str) -> None:
        """Stop serving implementation ``name`` (the patch stays applied for the others)."""
        self.names.discard(name)
        if self._saved:
            self._extra_revert()
            self._extra_apply()

    def revert(self) -> None:
        """Restore every replaced attribute (no-op when not applied)."""
        self._extra_revert()
        for owner, attr, had, old in reversed(self._saved):
            if had:
                setattr(owner, attr, old)
            else:
                delattr(owner, attr)
        self._saved.clear()
        self.names.clear()


def wrap_attention_forward(orig: Callable, flex_forward: Callable) -> Callable:
    """Wrap an attention ``forward``: flex path when ``attention_mask`` is a BlockMask.

    ``flex_forward`` is called with all bound arguments by name (``self`` included, extra
    ``**kwargs`` flattened in).
    """
    from torch.nn.attention.flex_attention import BlockMask

    sig = inspect.signature(orig)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError:
            return orig(self, *args, **kwargs)
        if not isinstance(bound.arguments.get("attention_mask"), BlockMask):
            return orig(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        if var_kw is not None:
            arguments.update(arguments.pop(var_kw, {}))
        return flex_forward(**arguments)

    forward._hf_flexattn_original = orig  # type: ignore[attr-defined]
    return forward


_PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")
# the packed-row kwargs of the model call in progress (see wrap_packing_forward)
_PACKING: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "hf_flexattn_packing", default=None
)


def wrap_packing_forward(orig: Callable, names: set[str]) -> Callable:
    """Wrap a model-level ``forward`` that does not pass packed-row kwargs on to attention.

    For a model whose ``config._attn_implementation`` is in ``names`` (a live set: the
    patch's served names), the kwargs of ``_PACKING_KEYS`` that ``orig`` does not declare
    (it would drop them) are taken out and held for the call; :func:`wrap_mask_creation`
    reads them. Other models, and calls without such kwargs, run ``orig`` unchanged.
    """
    sig = inspect.signature(orig)
    declared = set(sig.parameters)

    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        impl = getattr(getattr(self, "config", None), "_attn_implementation", None)
        if impl not in names:
            return orig(self, *args, **kwargs)
        found = {
            k: kwargs.pop(k)
            for k in _PACKING_KEYS
            if k not in declared and kwargs.get(k) is not None
        }
        if not found:
            return orig(self, *args, **kwargs)
        outer = _PACKING.get() or {}
        try:
            given = sig.bind_partial(self, *args, **kwargs).arguments.get("attention_mask")
        except TypeError:
            given = None
        # whether the caller gave no padding mask (some versions make an all-ones one)
        found["_no_mask"] = outer.get("_no_mask", True) and given is None
        token = _PACKING.set({**outer, **found})
        try:
            return orig(self, *args, **kwargs)
        finally:
            _PACKING.reset(token)

    forward._hf_flexattn_original = orig  # type: ignore[attr-defined]
    return forward


def wrap_mask_creation(orig: Callable) -> Callable:
    """Wrap a family module's ``create_causal_mask``: inside a call that holds packed-row
    kwargs (:func:`wrap_packing_forward`), a flex BlockMask over ``L`` queries and ``L`` keys
    becomes the packed-document mask (``cu_seq_lens_q``, else ``position_ids`` restarting at
    0; :func:`hf_flexattn.integrations.transformers.select_mask`)."""
    from torch.nn.attention.flex_attention import BlockMask

    @functools.wraps(orig)
    def create_causal_mask(*args, **kwargs):
        mask = orig(*args, **kwargs)
        packing = _PACKING.get()
        if not packing or not isinstance(mask, BlockMask):
            return mask
        from hf_flexattn.integrations.transformers import get_mask_info, select_mask

        Lq, Lk = (int(n) for n in mask.seq_lengths)
        if Lq != Lk:
            return mask  # a step against a cache: no packed rows there
        emb = kwargs.get("inputs_embeds")
        B = emb.shape[0] if isinstance(emb, torch.Tensor) else mask.kv_num_blocks.shape[0]
        # without a caller's padding mask, the packed-row kwargs define the structure alone
        # (Transformers 5.17's Bloom passes an all-ones mask of its own here)
        given = None if packing.get("_no_mask") else mask
        packed, _ = select_mask(given, B, Lq, Lk, mask.kv_num_blocks.device, None, True, packing)
        info = get_mask_info(packed)
        return packed if info is not None and info.docs is not None else mask

    create_causal_mask._hf_flexattn_original = orig  # type: ignore[attr-defined]
    return create_causal_mask


def packing_targets(
    module: Any,
    prefix: str,
    names: set[str],
    skip: tuple[str, ...] = (),
    mask_outer: Callable | None = None,
) -> list[tuple[Any, str, Any]]:
    """Patch targets for packed rows in one family module (``prefix``: ``"Bloom"`` etc.): the
    forward of every model class there (``{prefix}Model``, ``...ForCausalLM``, the
    classification and QA heads; not those named in ``skip``) and ``create_causal_mask``
    (wrapped once more by ``mask_outer``, for a family that also adjusts its masks)."""
    base = getattr(module, f"{prefix}PreTrainedModel")
    out = []
    for name, cls in sorted(vars(module).items()):
        if (
            isinstance(cls, type)
            and issubclass(cls, base)
            and cls is not base
            and name.startswith(prefix)
            and "forward" in vars(cls)
            and name not in skip
        ):
            out.append((cls, "forward", wrap_packing_forward(cls.forward, names)))
    mask = wrap_mask_creation(module.create_causal_mask)
    out.append((module, "create_causal_mask", mask if mask_outer is None else mask_outer(mask)))
    return out


def refuse_dropout(p: float, training: bool, family: str) -> None:
    """Raise when attention dropout would be needed (the flex path does not implement it)."""
    if p and p > 0 and training:
        raise ValueError(
            f"attention dropout is not supported by the 'flex' implementation ({family}: got "
            f"p={p} while training); set the config's attention dropout to 0 or call "
            "model.eval()."
        )


def pick_cache(arguments: dict[str, Any]) -> Any:
    """The KV cache under whichever name this Transformers version uses."""
    for k in ("cache", "past_key_values", "layer_past"):
        if arguments.get(k) is not None:
            return arguments[k]
    return None


def key_position_alibi(
    slopes: torch.Tensor,
    key_positions: torch.Tensor | None,
    kv_offset: int,
    *,
    bf16_product: bool = False,
    divisor: float | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Callable:
    """ALiBi that depends on the key position only (Bloom, Falcon), as a ``score_mod``.

    ``bias = slopes[h] * pos(b, kv)`` with ``pos = key_positions[b, kv]`` (padding-aware, as
    the model computes it) or ``kv_offset + kv``. ``bf16_product`` reproduces Falcon's product
    in bfloat16; ``divisor`` Falcon's division by ``sqrt(head_dim)``; ``out_dtype`` rounds the
    bias to the model dtype as the model does. Softmax is shift-invariant per row, so the
    model's key-only bias equals the usual relative ALiBi.
    """
    slopes = slopes.to(torch.float32)
    rounding = out_dtype != torch.float32

    def key_alibi(score, b, h, q_idx, kv_idx):
        pos = key_positions[b, kv_idx] if key_positions is not None else kv_idx + kv_offset
        if bf16_product:
            bias = (slopes[h] * pos.to(torch.bfloat16).to(torch.float32)).to(torch.bfloat16)
            bias = bias.to(torch.float32)
        else:
            bias = slopes[h] * pos
        if rounding:
            bias = bias.to(out_dtype).to(torch.float32)
        if divisor is not None:
            bias = bias / divisor
            if rounding:
                bias = bias.to(out_dtype).to(torch.float32)
        return score + bias

    return key_alibi


def mask_key_positions(block_mask: Any) -> tuple[torch.Tensor | None, int]:
    """``(key_positions [B, S] or None, kv_offset)`` from a mask built by ``flex_mask``."""
    from hf_flexattn.integrations.transformers import get_mask_info

    info = get_mask_info(block_mask)
    if info is None:
        return None, 0
    return info.alibi_key_positions(), int(info.kv_offset)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
_FAMILY_MODULES = {"bloom": "bloom", "falcon": "falcon", "mpt": "mpt"}


class _Registry(dict):
    """``model_type -> FamilyPatch``; family modules are imported on first access."""

    def __missing__(self, key: str) -> FamilyPatch:
        if key not in _FAMILY_MODULES:
            raise KeyError(key)
        mod = importlib.import_module(f"{__name__}.{_FAMILY_MODULES[key]}")
        patch = mod.Patch()
        self[key] = patch
        return patch

    def __contains__(self, key: object) -> bool:
        return key in _FAMILY_MODULES

    def keys(self):  # type: ignore[override]
        return _FAMILY_MODULES.keys()

    def __iter__(self):
        return iter(_FAMILY_MODULES)

    def __len__(self) -> int:
        return len(_FAMILY_MODULES)


#: ``model_type -> FamilyPatch`` for every family that needs a patch.
PATCHES: dict[str, FamilyPatch] = _Registry()
_AUTO_NAMES: set[str] = set()


def _model_type(model_or_type: Any) -> str:
    if isinstance(model_or_type, str):
        mt = model_or_type
    else:
        config = getattr(model_or_type, "config", model_or_type)
        mt = getattr(config, "model_type", None)
        if not isinstance(mt, str):
            raise TypeError(
                "model_or_type must be a model_type string, a PreTrainedModel or a config, got "
                f"{type(model_or_type).__name__}."
            )
    if mt not in PATCHES:
        raise ValueError(
            f"no hf_flexattn patch for model_type {mt!r}; patched families: {sorted(PATCHES)} "
            "(other models use the attention interface and need no patch)."
        )
    return mt


def apply_patch(model_or_type: Any, name: str = "flex") -> FamilyPatch:
    """Patch the family of ``model_or_type`` (a model_type, model or config); idempotent.

    ``name`` is the attention implementation the patch serves (default ``"flex"``). Returns
    the :class:`FamilyPatch`. Models of that family built later with
    ``attn_implementation=name`` (and existing ones: the patch is class-level) use flex.
    """
    patch = PATCHES[_model_type(model_or_type)]
    patch.apply(name)
    return patch


def revert(model_or_type: Any = None) -> None:
    """Undo the patch of one family, or of all families when called without argument."""
    types = list(PATCHES) if model_or_type is None else [_model_type(model_or_type)]
    for mt in types:
        if mt in dict.keys(PATCHES):
            dict.__getitem__(PATCHES, mt).revert()


def is_patched(model_or_type: Any) -> bool:
    """Whether the family of ``model_or_type`` is currently patched."""
    mt = _model_type(model_or_type)
    return mt in dict.keys(PATCHES) and dict.__getitem__(PATCHES, mt).applied


@contextlib.contextmanager
def patched(model_or_type: Any, name: str = "flex") -> Iterator[FamilyPatch]:
    """Context manager: patch the family inside the block, restore the previous state after."""
    was = is_patched(model_or_type)
    patch = apply_patch(model_or_type, name)
    try:
        yield patch
    finally:
        if not was:
            revert(model_or_type)


def install_auto(name: str = "flex") -> None:
    """Patch every family for implementation ``name`` (called by ``register``)."""
    _AUTO_NAMES.add(name)
    for mt in PATCHES:
        try:
            apply_patch(mt, name)
        except ImportError as err:  # pragma: no cover - a family missing in this Transformers
            logger.debug("patch for %s not installed: %s", mt, err)


def uninstall_auto(name: str = "flex") -> None:
    """Undo :func:`install_auto` (reverts all family patches)."""
    _AUTO_NAMES.discard(name)
    if not _AUTO_NAMES:
        revert()
        return
    for mt in PATCHES:
        if mt in dict.keys(PATCHES):
            dict.__getitem__(PATCHES, mt).forget(name)
