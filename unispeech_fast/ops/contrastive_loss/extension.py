"""The ``cpp`` backend of ``contrastive_loss``: ``torch.ops.unispeech_fast.contrastive_loss_fwd``/``_bwd``
(``csrc/cpu/contrastive_loss.cpp``), with its fake functions and autograd formula.

The kernel reads each masked row's K + 1 target rows in place: no ``[M, K, D]`` gather, memory
``O(M * K)`` for the backward's softmax weights. Registration happens on first use, after the
extension has loaded (importing this module loads nothing).
"""

from __future__ import annotations

import torch

from ... import _extension, dispatch
from .reference import flat_masked_inputs

__all__ = ["contrastive_loss_cpp"]

_CPP_DTYPES = (torch.float32, torch.float64)
_registered = False


def _kernel_available() -> bool:
    from .. import _extension_ops

    if not _extension_ops.ensure_registered():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("unispeech_fast::contrastive_loss_fwd", "CPU")


@_extension.constant_under_compile
def _ensure_registered() -> bool:
    """Register the fakes and the autograd formula once; True when the CPU kernel exists."""
    global _registered
    if _registered:
        return True
    try:
        available = _kernel_available()
    except RuntimeError:  # an extension built before this op existed has no such schema
        available = False
    if not available:
        return False

    @torch.library.register_fake("unispeech_fast::contrastive_loss_fwd")
    def _(predictions, targets, rows, negative_indices, code_indices, temperature):
        return predictions.new_empty(()), predictions.new_empty((rows.shape[0],))

    @torch.library.register_fake("unispeech_fast::contrastive_loss_bwd")
    def _(grad_loss, predictions, targets, rows, negative_indices, code_indices, lse, temperature):
        return torch.empty_like(predictions), torch.empty_like(targets)

    def setup(ctx, inputs, output):
        predictions, targets, rows, negative_indices, code_indices, temperature = inputs
        _, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.temperature = temperature
        ctx.save_for_backward(predictions, targets, rows, negative_indices, code_indices, lse)

    def backward(ctx, grad_loss, _grad_lse):
        predictions, targets, rows, negative_indices, code_indices, lse = ctx.saved_tensors
        grad_p, grad_t = torch.ops.unispeech_fast.contrastive_loss_bwd(
            grad_loss, predictions, targets, rows, negative_indices, code_indices, lse, ctx.temperature
        )
        return grad_p, grad_t, None, None, None, None

    torch.library.register_autograd("unispeech_fast::contrastive_loss_fwd", backward, setup_context=setup)
    _registered = True
    return True


def _cpp_reasons(predictions, targets, negative_indices, mask_time_indices, temperature, code_indices=None):
    reasons = []
    if predictions.device.type != "cpu":
        reasons.append(f"the C++ contrastive_loss serves CPU tensors, got {predictions.device.type}")
    if predictions.dtype not in _CPP_DTYPES:
        reasons.append(f"the C++ contrastive_loss runs float32/float64, got {predictions.dtype}")
    if not reasons and not _ensure_registered():
        reasons.append("the extension has no contrastive_loss_fwd kernel (built before the op existed: rebuild)")
    return reasons


def contrastive_loss_cpp(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    negative_indices: torch.Tensor,
    mask_time_indices: torch.Tensor,
    temperature: float,
    code_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused C++ loss; same contract and result as :func:`contrastive_loss_ref` (float32/float64)."""
    flat = flat_masked_inputs(predictions, targets, negative_indices, mask_time_indices, code_indices)
    loss, _ = torch.ops.unispeech_fast.contrastive_loss_fwd(*flat, float(temperature))
    return loss


dispatch.register("contrastive_loss", "cpp", not_supported_reasons=_cpp_reasons)(contrastive_loss_cpp)
