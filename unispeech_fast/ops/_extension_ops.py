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

__all__ = ["CPP_DTYPES", "cuda_ops", "ensure_registered", "on_load"]

#: What the C++ CPU kernels run (csrc/cpu: their dtype checks).
CPP_DTYPES = (torch.float32, torch.float64)

_registered = False
_hooks: list[tuple[tuple[str, ...], Callable[[], None]]] = []


def _has_schemas(names: tuple[str, ...]) -> bool:
    return all(hasattr(torch.ops.unispeech_fast, name) for name in names)


def on_load(*names: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorator: run the hook (the fakes and autograd formulas of the compiled ops ``names``) once the
    extension has loaded. An extension built before those ops existed lacks their schemas: the hook is
    skipped, and the backends report the missing kernels (dispatch's base check of ``Capabilities.kernels``)."""

    def deco(hook: Callable[[], None]) -> Callable[[], None]:
        _hooks.append((names, hook))
        if _registered and _has_schemas(names):
            hook()
        return hook

    return deco


@_extension.constant_under_compile  # called, not traced, by torch.compile (it loads and registers)
def ensure_registered() -> bool:
    """Load the extension and register the fakes and autograd formulas once; True when loaded."""
    global _registered
    if _registered:
        return True
    if not _extension.status().loaded:
        return False
    for names, hook in _hooks:
        if _has_schemas(names):
            hook()
    _registered = True
    return True


def _ops() -> Any:
    if not ensure_registered():
        raise dispatch.BackendNotSupportedError(f"C++ extension not available: {_extension.summary()[1]}")
    return torch.ops.unispeech_fast


def cuda_ops():
    """``torch.ops.unispeech_fast`` after loading the extension (raises if it has no CUDA kernels)."""
    _, _, has_cuda, cuda_reason = _extension.summary()
    if not has_cuda:
        raise dispatch.BackendNotSupportedError(f"CUDA extension not available: {cuda_reason}")
    return torch.ops.unispeech_fast
