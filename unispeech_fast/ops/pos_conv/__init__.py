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
from . import extension, triton  # noqa: F401  (register the cpp/cuda and triton backends; load nothing)
from .reference import pos_conv_ref

__all__ = ["pos_conv", "pos_conv_ref"]

dispatch.register("pos_conv", "eager")(pos_conv_ref)


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
