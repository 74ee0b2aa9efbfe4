"""The Gumbel-softmax product vector quantizer.

Logits ``[batch, frames, G * V]`` are split into G groups of V codevector logits. In training each
group draws a hard straight-through one-hot ``y = onehot(argmax(l + n)) - s.detach() + s`` with
``s = softmax((l + n) / tau)`` and Gumbel noise n (forward is hard, gradient flows through s); in
eval it is ``onehot(argmax(l))``. The output concatenates, over groups, the selected rows of the
codebook ``[1, G * V, D / G]``. The perplexity is ``sum_g exp(-sum_v p_gv log p_gv)`` with ``p`` the
mean of ``softmax(l)`` (training) or of the one-hots (eval) over all frames, or, with ``mask``
(bool ``[batch, frames]``, e.g. the masked non-padded frames of pre-training), over the frames where
it is True (transformers' Wav2Vec2 quantizer rule); ``mask=None`` is the unmasked mean, bit for bit.
Explicit noise ``gumbels`` (the shape of the logits) replaces the draw from torch's global generator:
the pre-training heads pass per-sample noise under the seeding rule (README "Training").
"""

from __future__ import annotations

import torch

from ... import dispatch
from ...dispatch import Capabilities
from .._extension_ops import CPP_DTYPES
from . import extension, triton  # neither imports triton nor loads the extension
from .reference import gumbel_quantizer_ref

__all__ = ["CAPABILITIES", "gumbel_quantizer", "gumbel_quantizer_ref"]

#: What each backend supports, as data: dispatch's one base check reads it; each backend's own
#: ``not_supported_reasons`` adds only the limits of the call (shapes, groups, codes per group).
CAPABILITIES = {
    "triton": Capabilities("the triton gumbel_quantizer", dtypes=triton.DTYPES),
    "cpp": Capabilities("the C++ gumbel_quantizer", devices=("cpu",), dtypes=CPP_DTYPES,
                        kernels=("gumbel_quantizer_fwd",)),
    # csrc/cuda/gumbel_quantizer.cu dispatches float, half and bfloat16 only.
    "cuda": Capabilities("the CUDA gumbel_quantizer", devices=("cuda",), dtypes=(torch.float32, torch.float16, torch.bfloat16),
                         kernels=("gumbel_quantizer_fwd",)),
}

# Gumbel sampling draws noise, unless the call brings its own (then verify mode compares it with the reference)
_stochastic = lambda sample=False, gumbels=None, **_: bool(sample) and gumbels is None  # noqa: E731
dispatch.register("gumbel_quantizer", "eager", is_stochastic=_stochastic)(gumbel_quantizer_ref)
dispatch.register("gumbel_quantizer", "triton", capabilities=CAPABILITIES["triton"], is_stochastic=_stochastic,
                  not_supported_reasons=triton._triton_not_supported_reasons)(triton._gumbel_quantizer_triton)
dispatch.register("gumbel_quantizer", "cpp", capabilities=CAPABILITIES["cpp"], is_stochastic=_stochastic,
                  not_supported_reasons=extension._gumbel_cpp_reasons)(extension.gumbel_quantizer_ext)
dispatch.register("gumbel_quantizer", "cuda", capabilities=CAPABILITIES["cuda"], is_stochastic=_stochastic,
                  not_supported_reasons=extension._gumbel_cuda_reasons)(extension.gumbel_quantizer_ext)


def _got(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_device(name: str, x: torch.Tensor, logits: torch.Tensor) -> None:
    if x.device != logits.device:
        raise ValueError(f"{name} must be on {logits.device}, got {x.device}")


def gumbel_quantizer(
    logits: torch.Tensor,
    codevectors: torch.Tensor,
    num_groups: int,
    temperature: float,
    sample: bool,
    mask: torch.Tensor | None = None,
    return_indices: bool = False,
    gumbels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gumbel vector quantizer on the selected backend; see :func:`gumbel_quantizer_ref`.

    ``mask`` (bool ``[batch, frames]``, at least one True) restricts the perplexity to those frames;
    ``return_indices`` adds the chosen codes ``[batch, frames, num_groups]`` (int64) to the outputs;
    ``gumbels`` (float, the shape and device of ``logits``, ``sample=True`` only) is the Gumbel noise to
    use instead of a draw from torch's global generator. Float32 noise (what the backends draw and the
    pre-training heads pass) is read exactly everywhere; the triton, cpp and cuda backends round noise
    of another dtype to float32, the eager reference computes in ``promote(logits, float32)``.
    Without them the call and its results are exactly those of before these options existed.
    """
    extra = {}
    shape = tuple(getattr(logits, "shape", ()))
    if (gumbels is not None or mask is not None) and not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor [batch, frames, num_groups * V], got {type(logits).__name__}")
    if gumbels is not None:
        if not sample:
            raise ValueError("gumbels (explicit Gumbel noise) is only used with sample=True")
        if not isinstance(gumbels, torch.Tensor) or not gumbels.is_floating_point() or \
                not isinstance(logits, torch.Tensor) or gumbels.shape != logits.shape:
            raise ValueError(f"gumbels must be a float tensor of the shape of logits {shape}, got {_got(gumbels)}")
        _check_device("gumbels", gumbels, logits)
        extra["gumbels"] = gumbels
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2 or \
                not isinstance(logits, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"mask must be a bool tensor [batch, frames] = {shape[:2]}, got {_got(mask)}")
        _check_device("mask", mask, logits)
        if not bool(mask.any()):
            raise ValueError("mask selects no frame: the perplexity over masked frames is undefined")
        extra["mask"] = mask
    if return_indices:
        extra["return_indices"] = True
    return dispatch.call(
        "gumbel_quantizer",
        logits=logits,
        codevectors=codevectors,
        num_groups=num_groups,
        temperature=temperature,
        sample=sample,
        **extra,
    )
