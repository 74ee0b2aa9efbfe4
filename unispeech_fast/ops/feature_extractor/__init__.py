"""The conv feature extractor: strided Conv1d layers, each with an optional norm, then an activation.

``norm_type="group"``: layer 0 is conv -> GroupNorm(C, C) (per-channel statistics over the whole
padded time axis) -> act, the other layers conv -> act. ``norm_type="layer"``: every layer is
conv -> LayerNorm over channels -> act. The norms always use eps 1e-5 (transformers ignores
``layer_norm_eps`` here).

The ``triton`` backend runs each layer as one fused Triton op (implicit-GEMM conv, bias, norm, exact
gelu) with a Triton backward (norm/gelu VJP and the conv's input and weight gradients); it fuses only
``activation="gelu"``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ... import dispatch
from . import extension, triton  # noqa: F401  (register the cpp/cuda and triton backends; load nothing)
from .reference import feature_extractor_ref

__all__ = ["feature_extractor", "feature_extractor_ref"]

dispatch.register("feature_extractor", "eager")(feature_extractor_ref)


def feature_extractor(
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
    """Conv feature extractor on the selected backend; see :func:`feature_extractor_ref`."""
    return dispatch.call(
        "feature_extractor",
        x=x,
        conv_weights=list(conv_weights),
        conv_biases=list(conv_biases),
        norm_weights=list(norm_weights),
        norm_biases=list(norm_biases),
        conv_strides=list(conv_strides),
        norm_type=norm_type,
        activation=activation,
        eps=eps,
    )
