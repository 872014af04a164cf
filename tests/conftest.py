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


@pytest.fixture
def prepare_calls(monkeypatch):
    """``{"prepare": n}``: how many times the Triton backend prepared a call (validation,
    mod tracing, kernel choice) since the test began; a stored plan skips it."""
    from hf_flexattn.backends import triton_backend as tb

    n = {"prepare": 0}
    real = tb.prepare

    def counted(*a, **k):
        n["prepare"] += 1
        return real(*a, **k)

    monkeypatch.setattr(tb, "prepare", counted)
    return n
