"""Render generated Triton kernel sources to files, import them, cache the jitted functions.

A kernel family (forward, backward) is a Python template; the mod code from
:mod:`hf_flexattn.compiler` is spliced in and the result is written to one file per
structural key under the cache dir (``HF_FLEXATTN_CACHE_DIR``, default
``~/.cache/hf_flexattn/kernels``). The file is named by a hash of its source, imported with
:mod:`importlib` (so ``triton.jit`` reads real source and tracebacks point to the file) and
kept in a dict keyed by the structural key, so a new closure with the same code reuses the
kernel. ``HF_FLEXATTN_DEBUG=1`` logs each path.

This module does not import triton; the rendered modules do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "cache_dir",
    "load_rendered",
    "render_count",
    "interpreter_on",
    "env_reader",
    "NoScoreMod",
    "NoMaskMod",
]

_logger = logging.getLogger(__name__)
_LOADED: dict[Any, ModuleType] = {}
_LOCK = threading.Lock()
_RENDERS: dict[str, int] = {}


def env_reader(name: str) -> Callable[[], str | None]:
    """A fast ``lambda: os.environ.get(name)``: the hot decoding path reads environment
    switches on every call, and ``os.environ.get`` encodes the name and decodes the value
    each time. On POSIX this looks the pre-encoded name up in the environment's bytes
    dictionary, which ``os.environ`` keeps current (``setenv``/``putenv`` go through it)."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return lambda: os.environ.get(name)
    key = os.environ.encodekey(name) if hasattr(os.environ, "encodekey") else name.encode()
    cache: dict[bytes, str] = {}

    def read() -> str | None:
        raw = data.get(key)
        if raw is None:
            return None
        val = cache.get(raw)
        if val is None:
            val = cache[raw] = os.fsdecode(raw)
            if len(cache) > 16:
                cache.clear()
        return val

    return read


_INTERPRET = env_reader("TRITON_INTERPRET")


def interpreter_on() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return _INTERPRET() not in (None, "", "0")


def _debug() -> bool:
    return os.environ.get("HF_FLEXATTN_DEBUG", "0") not in ("", "0")


def cache_dir() -> Path:
    """Directory for generated kernel sources (created on demand)."""
    env = os.environ.get("HF_FLEXATTN_CACHE_DIR")
    root = Path(env).expanduser() if env else Path("~/.cache/hf_flexattn").expanduser()
    path = root / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def render_count(family: str | None = None) -> int:
    """How many sources were rendered in this process (for one family, or all)."""
    if family is None:
        return sum(_RENDERS.values())
    return _RENDERS.get(family, 0)


def _write(path: Path, source: str) -> None:
    if path.exists():
        try:
            if path.read_text() == source:
                return
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    os.replace(tmp, path)


def load_rendered(family: str, key: Any, render: Callable[[], str]) -> ModuleType:
    """Return the imported module for ``key``, rendering ``render()`` to a file on first use."""
    mod = _LOADED.get(key)
    if mod is not None:
        return mod
    with _LOCK:
        mod = _LOADED.get(key)
        if mod is not None:
            return mod
        source = render()
        _RENDERS[family] = _RENDERS.get(family, 0) + 1
        digest = hashlib.sha1(source.encode()).hexdigest()[:20]
        name = f"{family}_{digest}"
        path = cache_dir() / f"{name}.py"
        _write(path, source)
        if _debug():
            _logger.warning("hf_flexattn: %s kernel source at %s", family, path)
        else:
            _logger.debug("hf_flexattn: %s kernel source at %s", family, path)
        mod_name = f"hf_flexattn_generated.{name}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:  # pragma: no cover - importlib failure
            raise ImportError(f"cannot import generated kernel {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
        _LOADED[key] = mod
        return mod


class NoScoreMod:
    """ModCode-compatible stand-in for ``score_mod=None`` (the score passes unchanged)."""

    kind = "score"
    key = ("hf_flexattn.no_score_mod",)
    captured: list = []
    specs: list = []
    params: list = []
    grad_params: list = []

    def runtime_args(self, pointers: bool = False) -> list:
        return []

    def fwd_body(
        self,
        *,
        out: str,
        score: str | None,
        b: str,
        h: str,
        q: str,
        kv: str,
        indent: str,
        transposed: bool = False,
    ) -> str:
        return f"{indent}{out} = {score}\n"

    def bwd_body(
        self,
        *,
        grad_score: str,
        grad_out: str,
        score: str,
        b: str,
        h: str,
        q: str,
        kv: str,
        valid: str,
        indent: str,
        transposed: bool = False,
    ) -> str:
        return f"{indent}{grad_score} = {grad_out}\n"


class NoMaskMod:
    """ModCode-compatible stand-in for a mask that allows everything (``noop_mask``)."""

    kind = "mask"
    key = ("hf_flexattn.no_mask_mod",)
    captured: list = []
    specs: list = []
    params: list = []
    grad_params: list = []

    def runtime_args(self, pointers: bool = False) -> list:
        return []

    def fwd_body(
        self,
        *,
        out: str,
        score: str | None,
        b: str,
        h: str,
        q: str,
        kv: str,
        indent: str,
        transposed: bool = False,
    ) -> str:
        return f"{indent}{out} = ({q} >= 0) & ({kv} >= 0)\n"
