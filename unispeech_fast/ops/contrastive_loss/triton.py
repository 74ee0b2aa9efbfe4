"""The ``triton`` backend of ``contrastive_loss``: launchers for ``unispeech_fast.kernels.contrastive_loss``,
custom ops with a fake and an autograd formula, and the dispatch entry.

Layers: kernels -> launchers (:func:`_forward`, :func:`_backward`: allocate, pick blocks, launch, and
the cheap ``O(N * D)`` torch epilogues: norms and the normalisation's VJP) -> custom ops ->
:func:`contrastive_loss_triton`. Nothing of size ``M * K * D`` is allocated.
"""

from __future__ import annotations

import torch

from .._triton_common import cdiv
from .common import MAX_D  # the kernels' limit, read without importing triton
from .reference import flat_masked_inputs

__all__ = ["contrastive_loss_triton"]

#: What the kernels run (``kernels/contrastive_loss.py``).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_EPS = 1e-8


def _norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(max(|x|, eps), |x| >= eps)`` per row of ``x [N, D]``."""
    norm = x.float().norm(dim=-1)
    return norm.clamp_min(_EPS), norm >= _EPS


def _launch_args(predictions, targets, rows, negatives, codes):
    from ...kernels import contrastive_loss as kern

    m, k = negatives.shape
    dim = predictions.shape[1]
    has_codes = codes is not None
    codes_t = codes if has_codes else rows  # unread without HAS_CODES
    consts = dict(HAS_CODES=has_codes, **kern.launch_config(dim))
    grid = (cdiv(m, consts["BLOCK_M"]),)
    return kern, grid, codes_t, (m, k, dim, codes.shape[1] if has_codes else 0), consts


def _forward(predictions, targets, rows, negatives, codes, temperature):
    kern, grid, codes_t, (m, k, dim, g), consts = _launch_args(predictions, targets, rows, negatives, codes)
    pnorm, _ = _norms(predictions)
    tnorm, _ = _norms(targets)
    lse = torch.empty(m, device=predictions.device, dtype=torch.float32)
    row_loss = torch.empty(m, device=predictions.device, dtype=torch.float32)
    if m > 0:
        kern._contrastive_fwd_kernel[grid](predictions, targets, rows, negatives, codes_t, pnorm, tnorm, lse, row_loss,
                                           m, k, dim, g, 1.0 / float(temperature), **consts)
    return row_loss.sum(), lse


def _backward(grad_loss, predictions, targets, rows, negatives, codes, lse, temperature):
    kern, grid, codes_t, (m, k, dim, g), consts = _launch_args(predictions, targets, rows, negatives, codes)
    pnorm, p_ok = _norms(predictions)
    tnorm, t_ok = _norms(targets)
    v = torch.empty(m, dim, device=predictions.device, dtype=torch.float32)
    u = torch.zeros(targets.shape, device=targets.device, dtype=torch.float32)
    if m > 0:
        kern._contrastive_bwd_kernel[grid](predictions, targets, rows, negatives, codes_t, pnorm, tnorm, lse, v, u,
                                           m, k, dim, g, 1.0 / float(temperature), **consts)
    scale = grad_loss.float() / float(temperature)

    def normalisation_vjp(x, norm, ok, w):
        xhat = x.float() / norm[:, None]
        projected = (w - xhat * (xhat * w).sum(-1, keepdim=True)) / norm[:, None]
        return torch.where(ok[:, None], projected, w / norm[:, None]) * scale

    grad_p = torch.zeros(predictions.shape, device=predictions.device, dtype=torch.float32)
    grad_p[rows] = normalisation_vjp(predictions[rows], pnorm[rows], p_ok[rows], v)
    grad_t = normalisation_vjp(targets, tnorm, t_ok, u)
    return grad_p.to(predictions.dtype), grad_t.to(targets.dtype)


@torch.library.custom_op("unispeech_fast::triton_contrastive_loss_fwd", mutates_args=())
def _fwd_op(predictions: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, negatives: torch.Tensor,
            codes: torch.Tensor | None, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss fp32 0-d, lse fp32 [M])`` for ``predictions``/``targets`` ``[N, D]``, ``rows [M]`` and
    ``negatives [M, K]``."""
    return _forward(predictions, targets, rows, negatives, codes, temperature)


@_fwd_op.register_fake
def _(predictions, targets, rows, negatives, codes, temperature):
    return predictions.new_empty((), dtype=torch.float32), predictions.new_empty((rows.shape[0],), dtype=torch.float32)


@torch.library.custom_op("unispeech_fast::triton_contrastive_loss_bwd", mutates_args=())
def _bwd_op(grad_loss: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
            negatives: torch.Tensor, codes: torch.Tensor | None, lse: torch.Tensor,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_predictions, grad_targets)``, both ``[N, D]``."""
    return _backward(grad_loss, predictions, targets, rows, negatives, codes, lse, temperature)


@_bwd_op.register_fake
def _(grad_loss, predictions, targets, rows, negatives, codes, lse, temperature):
    return torch.empty_like(predictions), torch.empty_like(targets)


def _setup(ctx, inputs, output):
    predictions, targets, rows, negatives, codes, temperature = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.temperature = temperature
    ctx.save_for_backward(predictions, targets, rows, negatives, codes, output[1])


def _backward_rule(ctx, grad_loss, _grad_lse):
    predictions, targets, rows, negatives, codes, lse = ctx.saved_tensors
    grad_p, grad_t = _bwd_op(grad_loss, predictions, targets, rows, negatives, codes, lse, ctx.temperature)
    return grad_p, grad_t, None, None, None, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup)


def _reasons(predictions, targets, negative_indices, mask_time_indices, temperature, code_indices=None):
    reasons = []
    if predictions.device.type == "cpu" and predictions.dtype == torch.bfloat16:
        reasons.append("bfloat16 is broken in the Triton interpreter (CPU tensors); use float16/float32 or a GPU")
    if predictions.shape[-1] > MAX_D:
        reasons.append(f"feature width D = {predictions.shape[-1]} exceeds the kernel's maximum {MAX_D}")
    return reasons


def contrastive_loss_triton(
    predictions, targets, negative_indices, mask_time_indices, temperature, code_indices=None
):
    """The fused Triton loss; same contract as :func:`contrastive_loss_ref`; returns fp32."""
    flat = flat_masked_inputs(predictions, targets, negative_indices, mask_time_indices, code_indices)
    loss, _ = torch.ops.unispeech_fast.triton_contrastive_loss_fwd(*flat, float(temperature))
    return loss.to(torch.promote_types(predictions.dtype, torch.float32))

