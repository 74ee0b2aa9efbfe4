"""Eager reference of the ``pos_conv`` op (:func:`pos_conv_ref`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...activations import get_activation

__all__ = ["pos_conv_ref"]


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
