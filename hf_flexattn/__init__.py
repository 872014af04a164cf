"""hf_flexattn: FlexAttention-style fused, block-sparse attention for Hugging Face models.

The API mirrors :mod:`torch.nn.attention.flex_attention`; switching is a change of import::

    from hf_flexattn import flex_attention, create_block_mask

Importing the package registers the ``"flex"`` attention implementation with Transformers
(see :func:`register`).
"""

from __future__ import annotations

import logging

from . import mods
from .api import flex_attention
from .block_mask import (
    BlockMask,
    and_masks,
    create_block_mask,
    create_causal_block_mask,
    create_document_block_mask,
    create_mask,
    create_sliding_window_block_mask,
    noop_mask,
    or_masks,
)

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "and_masks",
    "create_block_mask",
    "create_causal_block_mask",
    "create_document_block_mask",
    "create_mask",
    "create_sliding_window_block_mask",
    "flex_attention",
    "mods",
    "noop_mask",
    "or_masks",
    "register",
    "__version__",
]

_logger = logging.getLogger(__name__)


def register(name: str = "flex") -> None:
    """Register ``name`` with Transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent. ``import hf_flexattn`` already calls ``register("flex")``.
    """
    from .integrations.transformers import register as _register

    _register(name)


try:  # Transformers is a dependency, but keep the kernels usable without it.
    register("flex")
except ImportError as _err:  # pragma: no cover - depends on the environment
    _logger.debug("Transformers integration not registered: %s", _err)
