"""The grouped, weight-normed positional convolution with its residual add.

``y = x + act(conv1d(x, W, bias, padding=K//2, groups)[..., :T])`` with ``W = g * v / ||v||``, the
norm taken over the output- and input-channel dims separately for each tap (weight norm with
``dim=2``, as ``torch.nn.utils.parametrizations.weight_norm(conv, dim=2)`` computes it). For even K
the convolution yields T + 1 frames and the last is dropped (transformers' ``SamePad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from ..activations import get_activation

__all__ = ["pos_conv", "pos_conv_ref"]


def pos_conv_ref(
    x: torch.Tensor,
    weight_g: torch.Tensor,
    weight_v: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    activation: str = "gelu",
) -> torch.Tensor:
    """Eager reference.

    Args:
        x: hidden states ``[batch, frames, hidden]``.
        weight_g: ``[1, 1, kernel]``; weight_v: ``[hidden, hidden // groups, kernel]``; bias ``[hidden]``.

    Returns:
        ``x + pos(x)``, ``[batch, frames, hidden]``.
    """
    kernel = weight_v.shape[-1]
    weight = torch._weight_norm(weight_v, weight_g, 2)
    h = F.conv1d(x.transpose(1, 2), weight, bias, padding=kernel // 2, groups=groups)
    if kernel % 2 == 0:
        h = h[:, :, :-1]
    h = get_activation(activation)(h).transpose(1, 2)
    return x + h


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
