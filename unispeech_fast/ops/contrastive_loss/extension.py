"""The ``cpp`` backend of ``contrastive_loss``: ``torch.ops.unispeech_fast.contrastive_loss_fwd``/``_bwd``
(``csrc/cpu/contrastive_loss.cpp``), with its fake functions and autograd formula.

The kernel reads each masked row's K + 1 target rows in place: no ``[M, K, D]`` gather, memory
``O(M * K)`` for the backward's softmax weights. The fakes and the autograd formula are registered when
the extension loads (:func:`unispeech_fast.ops._extension_ops.on_load`; skipped for an extension built
before the op existed, which the backend's capabilities then report); importing this module loads nothing.
"""

from __future__ import annotations

import torch

from .._extension_ops import _ops, on_load
from .reference import flat_masked_inputs

__all__ = ["contrastive_loss_cpp"]


@on_load("contrastive_loss_fwd", "contrastive_loss_bwd")
def _register() -> None:
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


def contrastive_loss_cpp(predictions, targets, negative_indices, mask_time_indices, temperature, code_indices=None):
    """The fused C++ loss; same contract and result as :func:`contrastive_loss_ref` (float32/float64)."""
    ops = _ops()
    flat = flat_masked_inputs(predictions, targets, negative_indices, mask_time_indices, code_indices)
    loss, _ = ops.contrastive_loss_fwd(*flat, float(temperature))
    return loss
