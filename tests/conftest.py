"""Test set-up: Triton interpreter on CPU-only machines, the `cuda` marker."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is first imported: the Triton kernels then run on CPU
    # tensors in Triton's interpreter (tests marked `interpreter`).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
