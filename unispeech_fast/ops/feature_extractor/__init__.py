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
from ...dispatch import Capabilities
from .._extension_ops import CPP_DTYPES
from . import extension, triton  # neither imports triton nor loads the extension
from .common import NormKind, conv_output_length
from .reference import feature_extractor_ref

__all__ = ["CAPABILITIES", "NormKind", "conv_output_length", "feature_extractor", "feature_extractor_ref"]

#: What each backend supports, as data: dispatch's one base check reads it; each backend's own
#: ``not_supported_reasons`` adds only the limits of the call (layers, norms, channels, shared memory).
CAPABILITIES = {
    "triton": Capabilities("the triton feature extractor", dtypes=triton.DTYPES),
    "cpp": Capabilities("the C++ feature extractor", devices=("cpu",), dtypes=CPP_DTYPES,
                        kernels=("conv_norm_gelu_fwd",)),
    # The backend's reasons also check the device, naming ``x`` (wording pinned by tests).
    "cuda": Capabilities("the CUDA feature extractor", devices=("cuda",), dtypes=extension.CUDA_DTYPES,
                         kernels=("conv_norm_gelu_fwd",)),
}

dispatch.register("feature_extractor", "eager")(feature_extractor_ref)
dispatch.register("feature_extractor", "triton", capabilities=CAPABILITIES["triton"],
                  not_supported_reasons=triton._triton_not_supported_reasons)(triton.feature_extractor_triton)
dispatch.register("feature_extractor", "cpp", capabilities=CAPABILITIES["cpp"],
                  not_supported_reasons=extension._feature_cpp_reasons)(extension.feature_extractor_ext)
dispatch.register("feature_extractor", "cuda", capabilities=CAPABILITIES["cuda"],
                  not_supported_reasons=extension._cuda_reasons)(extension.feature_extractor_cuda)


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
