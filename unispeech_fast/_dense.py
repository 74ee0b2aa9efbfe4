"""The dense-layer policy: which ``nn.Linear`` calls of the modules go through the dispatched
:func:`unispeech_fast.ops.linear` and which run as the modules they are.

Modules call :func:`dense` and nothing else. The policy is the ``linear`` op's: it belongs with the
op's declared capabilities (``unispeech_fast/ops/linear/``) once that package exists; until then it
lives here, in one place, rather than inside :mod:`unispeech_fast.modules`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import dispatch, ops

__all__ = ["dense"]


def _plain_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` that nothing wraps or hooks (PEFT/LoRA replace or hook such layers:
    those are called as modules, never bypassed through their weights)."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not module._backward_hooks and not module._backward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
            and not nn.modules.module._global_backward_hooks and not nn.modules.module._global_backward_pre_hooks)


def _dispatch_dense() -> bool:
    # The dense layers go through dispatch under auto and cpp only: the eager, triton and cuda backends
    # are about the fused ops, and F.linear (cuBLAS on a GPU) is what their dense layers run.
    return dispatch.current_backend() in ("auto", "cpp")


def dense(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain ``nn.Linear`` under ``backend("auto"|"cpp")`` goes through the dispatched
    :func:`unispeech_fast.ops.linear` (oneDNN on CPU for inference, else ``F.linear``).

    ``x`` is ``[..., in_features]``; the result ``[..., out_features]``.
    """
    if _plain_linear(module) and _dispatch_dense():
        return ops.linear(x, module.weight, module.bias)
    return module(x)
