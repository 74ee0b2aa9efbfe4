"""``contrastive_loss``: the InfoNCE term of wav2vec 2.0 / UniSpeech pre-training, as a dispatched op.

Input contract (checked here, before dispatch; errors name the argument):

* ``predictions`` ``[B, T, D]`` floating: the model's prediction per frame (UniSpeech: the raw
  encoder output; wav2vec 2.0: ``project_hid`` of it).
* ``targets`` ``[B, T, D]``, same dtype: the positive per frame (the projected quantized vector);
  negatives are rows of its flattened ``[B*T, D]`` view.
* ``negative_indices`` int ``[B, T, K]``: indices into the flattened ``B*T`` axis, transformers'
  ``_sample_negative_indices`` format (:func:`unispeech_fast.pretraining.sample_negative_indices`);
  only masked frames' entries are read and they must be in ``[0, B*T)``.
* ``mask_time_indices`` bool ``[B, T]``: the frames that contribute (masked, non-padded).
* ``temperature`` > 0.
* ``code_indices`` optional int ``[B, T, G]``: the quantizer's code per group. A negative whose codes
  equal the positive's in every group is excluded (exact in any dtype and under any kernel). Without
  it, negatives equal to the positive in every element are excluded (transformers' rule).

Returns the loss summed over the masked frames, a 0-d tensor (fp32 for half inputs, else the input
dtype). Backends: ``eager`` (:func:`contrastive_loss_ref`) and ``cpp`` (CPU float32/float64, the fused
kernel of ``csrc/cpu/contrastive_loss.cpp``, :mod:`.extension`) and ``triton`` (fp16/bf16/fp32,
``kernels/contrastive_loss.py``, :mod:`.triton`; on CPU only under the interpreter).
"""

from __future__ import annotations

import torch

from ... import dispatch
from ...dispatch import Capabilities
from .._extension_ops import CPP_DTYPES
from . import extension, triton  # neither imports triton nor loads the extension
from .reference import contrastive_loss_ref

__all__ = ["CAPABILITIES", "contrastive_loss", "contrastive_loss_ref"]

#: What each backend supports, as data: dispatch's one base check reads it; the triton backend's own
#: ``not_supported_reasons`` adds only the limits of the call (feature width, bf16 under the interpreter).
CAPABILITIES = {
    "triton": Capabilities("the Triton contrastive_loss", dtypes=triton.DTYPES),
    "cpp": Capabilities("the C++ contrastive_loss", devices=("cpu",), dtypes=CPP_DTYPES,
                        kernels=("contrastive_loss_fwd", "contrastive_loss_bwd")),
}

dispatch.register("contrastive_loss", "eager")(contrastive_loss_ref)
dispatch.register("contrastive_loss", "triton", capabilities=CAPABILITIES["triton"],
                  not_supported_reasons=triton._reasons)(triton.contrastive_loss_triton)
dispatch.register("contrastive_loss", "cpp", capabilities=CAPABILITIES["cpp"])(extension.contrastive_loss_cpp)


def _is_int_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_contrastive_inputs(predictions, targets, negative_indices, mask_time_indices, temperature,
                             code_indices=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first argument that breaks the input contract."""
    if not isinstance(predictions, torch.Tensor) or predictions.dim() != 3 or not predictions.is_floating_point():
        raise ValueError(f"predictions must be a floating-point tensor [batch, frames, dim], got {_shape(predictions)}")
    batch, frames, _ = predictions.shape
    if not isinstance(targets, torch.Tensor) or targets.shape != predictions.shape:
        raise ValueError(f"targets must have the shape of predictions {tuple(predictions.shape)}, "
                         f"got {_shape(targets)}")
    if targets.dtype != predictions.dtype or targets.device != predictions.device:
        raise TypeError(f"targets must have the dtype and device of predictions ({predictions.dtype}, "
                        f"{predictions.device}), got {targets.dtype} on {targets.device}")
    if not _is_int_tensor(negative_indices) or negative_indices.dim() != 3 or \
            tuple(negative_indices.shape[:2]) != (batch, frames) or negative_indices.shape[2] < 1:
        raise ValueError(f"negative_indices must be an integer tensor [batch={batch}, frames={frames}, K >= 1], "
                         f"got {_shape(negative_indices)} "
                         f"{negative_indices.dtype if isinstance(negative_indices, torch.Tensor) else ''}".rstrip())
    if not isinstance(mask_time_indices, torch.Tensor) or mask_time_indices.dtype != torch.bool or \
            tuple(mask_time_indices.shape) != (batch, frames):
        raise ValueError(f"mask_time_indices must be a bool tensor [batch={batch}, frames={frames}], got "
                         f"{_shape(mask_time_indices)} "
                         f"{mask_time_indices.dtype if isinstance(mask_time_indices, torch.Tensor) else ''}".rstrip())
    for name, t in (("negative_indices", negative_indices), ("mask_time_indices", mask_time_indices)):
        if t.device != predictions.device:
            raise ValueError(f"{name} must be on {predictions.device}, got {t.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if code_indices is not None:
        if not _is_int_tensor(code_indices) or code_indices.dim() != 3 or \
                tuple(code_indices.shape[:2]) != (batch, frames) or code_indices.device != predictions.device:
            raise ValueError(f"code_indices must be an integer tensor [batch={batch}, frames={frames}, groups] on "
                             f"{predictions.device}, got {_shape(code_indices)}")
    used = negative_indices[mask_time_indices]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= batch * frames):
        raise ValueError(f"negative_indices of masked frames must be in [0, batch * frames = {batch * frames}), "
                         f"got values in [{int(used.min())}, {int(used.max())}]")


def contrastive_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    negative_indices: torch.Tensor,
    mask_time_indices: torch.Tensor,
    temperature: float,
    code_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed InfoNCE loss over the masked frames on the selected backend (module docstring)."""
    check_contrastive_inputs(predictions, targets, negative_indices, mask_time_indices, temperature, code_indices)
    return dispatch.call(
        "contrastive_loss",
        predictions=predictions,
        targets=targets,
        negative_indices=negative_indices,
        mask_time_indices=mask_time_indices,
        temperature=float(temperature),
        code_indices=code_indices,
    )
