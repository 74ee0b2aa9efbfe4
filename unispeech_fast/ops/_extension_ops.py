"""What every op's ``extension.py`` shares: loading the compiled ops ``torch.ops.unispeech_fast.*``
(schemas in ``csrc/schemas.cpp``) and registering their fakes and autograd formulas once.

Each op's ``extension.py`` declares its fakes and autograd formula in a function decorated with
:func:`on_load`; :func:`ensure_registered` runs them all on the first call that needs the ops, after
:func:`unispeech_fast._extension.status` has loaded the extension. Importing this module (or any op's
``extension.py``) never loads the extension, and where it is missing every backend reports why it
cannot run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .. import _extension, dispatch

__all__ = ["cuda_extension_reasons", "cuda_ops", "ensure_registered", "on_load"]

_NS = "unispeech_fast"
_CPP_DTYPES = (torch.float32, torch.float64)

_registered = False
_hooks: list[Callable[[], None]] = []


def on_load(hook: Callable[[], None]) -> Callable[[], None]:
    """Register ``hook`` (an op's fakes and autograd formulas) to run once the extension has loaded."""
    _hooks.append(hook)
    if _registered:
        hook()
    return hook


@_extension.constant_under_compile  # called, not traced, by torch.compile (it loads and registers)
def ensure_registered() -> bool:
    """Load the extension and register the fakes and autograd formulas once; True when loaded."""
    global _registered
    if _registered:
        return True
    if not _extension.status().loaded:
        return False
    for hook in _hooks:
        hook()
    _registered = True
    return True


def _ops() -> Any:
    if not ensure_registered():
        raise dispatch.BackendNotSupportedError(f"C++ extension not available: {_extension.summary()[1]}")
    return torch.ops.unispeech_fast


def _has_kernel(op: str, key: str) -> bool:
    return ensure_registered() and torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NS}::{op}", key)


def cuda_extension_reasons() -> list[str]:
    """Why the extension's CUDA kernels cannot run (empty when they were built)."""
    _, _, has_cuda, cuda_reason = _extension.summary()
    return [] if has_cuda else [f"CUDA extension not available: {cuda_reason}"]


def cuda_ops():
    """``torch.ops.unispeech_fast`` after loading the extension (raises if it has no CUDA kernels)."""
    _, _, has_cuda, cuda_reason = _extension.summary()
    if not has_cuda:
        raise dispatch.BackendNotSupportedError(f"CUDA extension not available: {cuda_reason}")
    return torch.ops.unispeech_fast
