"""Eager reference of the ``feature_extractor`` op (:func:`feature_extractor_ref`)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...activations import get_activation

__all__ = ["feature_extractor_ref"]


def feature_extractor_ref(
    x: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor | None],
    norm_weights: Sequence[torch.Tensor | None],
    norm_biases: Sequence[torch.Tensor | None],
    conv_strides: Sequence[int],
    norm_type: str,
    activation: str = "gelu",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Eager reference.

    Args:
        x: waveform ``[batch, samples]``.
        conv_weights: per layer ``[C_out, C_in, kernel]``; ``conv_biases`` per layer ``[C_out]`` or None.
        norm_weights, norm_biases: per layer ``[C_out]``, or None for layers without a norm.
        conv_strides: per layer stride.
        norm_type: ``"group"`` or ``"layer"``.

    Returns:
        features ``[batch, C_last, frames]``.
    """
    act = get_activation(activation)
    h = x[:, None]
    for i, (w, b, stride) in enumerate(zip(conv_weights, conv_biases, conv_strides)):
        h = F.conv1d(h, w, b, stride=stride)
        gamma, beta = norm_weights[i], norm_biases[i]
        if gamma is not None:
            if norm_type == "group":
                h = F.group_norm(h, h.shape[1], gamma, beta, eps)
            elif norm_type == "layer":
                h = F.layer_norm(h.transpose(-2, -1), (h.shape[1],), gamma, beta, eps).transpose(-2, -1)
            else:
                raise ValueError(f"norm_type must be 'group' or 'layer', got {norm_type!r}")
        h = act(h)
    return h
