"""The grouped, weight-normed positional convolution with its residual add.

``y = x + act(conv1d(x, W, bias, padding=K//2, groups)[..., :T])`` with ``W = g * v / ||v||``, the
norm taken over the output- and input-channel dims separately for each tap (weight norm with
``dim=2``, as ``torch.nn.utils.parametrizations.weight_norm(conv, dim=2)`` computes it). For even K
the convolution yields T + 1 frames and the last is dropped (transformers' ``SamePad``).

Backends: ``eager`` (:func:`pos_conv_ref`) and ``triton`` (``kernels/pos_conv.py``: one fused
implicit-GEMM kernel for conv + bias + exact GELU + residual; backward as GELU'-scaling, a second
implicit GEMM for the input gradient and a split reduction for the weight gradient), registered as
the custom ops ``unispeech_fast::triton_pos_conv_fwd`` / ``_bwd``. The weight norm itself stays in
torch: folded on every call (no cache that could go stale), and differentiated by torch's
weight-norm backward under autograd.
"""

from __future__ import annotations

import torch

from ... import dispatch
from ...dispatch import Capabilities
from .._extension_ops import CPP_DTYPES
from . import extension, triton  # neither imports triton nor loads the extension
from .reference import pos_conv_ref

__all__ = ["CAPABILITIES", "pos_conv", "pos_conv_ref"]

#: What each backend supports, as data: dispatch's one base check reads it; each backend's own
#: ``not_supported_reasons`` adds only the limits of the call (shapes, channels per group).
CAPABILITIES = {
    "triton": Capabilities("the triton pos_conv", dtypes=triton.DTYPES),
    "cpp": Capabilities("the C++ pos_conv", devices=("cpu",), dtypes=CPP_DTYPES, kernels=("pos_conv_fwd",)),
    "cuda": Capabilities("the CUDA pos_conv", devices=("cuda",), dtypes=extension.CUDA_DTYPES,
                         kernels=("pos_conv_fwd",)),
}

dispatch.register("pos_conv", "eager")(pos_conv_ref)
dispatch.register("pos_conv", "triton", capabilities=CAPABILITIES["triton"],
                  not_supported_reasons=triton._triton_not_supported)(triton._pos_conv_triton)
dispatch.register("pos_conv", "cpp", capabilities=CAPABILITIES["cpp"],
                  not_supported_reasons=extension._pos_conv_cpp_reasons)(extension.pos_conv_ext)
dispatch.register("pos_conv", "cuda", capabilities=CAPABILITIES["cuda"],
                  not_supported_reasons=extension._pos_conv_cuda_reasons)(extension.pos_conv_ext)


def pos_conv(
    x: torch.Tensor,
    weight_g: torch.Tensor,
    weight_v: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    activation: str = "gelu",
) -> torch.Tensor:
    """Positional conv plus residual on the selected backend; see :func:`pos_conv_ref`."""
    return dispatch.call(
        "pos_conv", x=x, weight_g=weight_g, weight_v=weight_v, bias=bias, groups=groups, activation=activation
    )
