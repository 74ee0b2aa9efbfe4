"""The facts every layer of the stack and every backend of ``feature_extractor`` share, kept once: the norm
codes (:class:`NormKind`), the conv output length (:func:`conv_output_length`) and the Triton kernels' limit
(:data:`MAX_LAYER_NORM_CHANNELS`, the widest layer-norm row the kernels' block choice serves, read by the triton
backend's reasons without importing triton).

Imports nothing from the package, so that the configuration, the models, the tiling, the op's backends and
the Triton launchers (``unispeech_fast.kernels.feature_extractor``) can all use it.
"""

from __future__ import annotations

import enum

__all__ = ["MAX_LAYER_NORM_CHANNELS", "NormKind", "conv_output_length"]

#: Largest C_out the Triton layer-norm path holds in one tile (all channels of a frame in one program).
MAX_LAYER_NORM_CHANNELS = 512


class NormKind(enum.IntEnum):
    """The norm of one feature-extractor layer, as the int code every backend takes.

    One table for the ``norm_kind`` argument of ``unispeech_fast::conv_norm_gelu_fwd`` (its schema in
    ``csrc/schemas.cpp``; the C++ and CUDA kernels), the ``norm`` argument of the Triton custom op
    ``unispeech_fast::triton_feature_extractor_layer`` and of the Triton launchers. The tests of the op check
    that every backend reads each code as the same norm.
    """

    NONE = 0
    GROUP = 1  #: GroupNorm(C, C): per-channel statistics over time (``norm_type="group"``)
    LAYER = 2  #: LayerNorm over the channels of each frame (``norm_type="layer"``)

    @classmethod
    def of(cls, norm_type: str, has_norm: bool = True) -> NormKind:
        """The code of a layer with ``norm_type`` (``"group"`` or ``"layer"``), or NONE when it has no norm."""
        return cls.NONE if not has_norm else cls[norm_type.upper()]


def conv_output_length(length, kernel: int, stride: int):
    """Frames out of an unpadded strided conv over ``length`` samples: ``(length - kernel) // stride + 1``.

    ``length`` may be an int or an integer tensor (per-row lengths); below the kernel size the result is 0 or
    negative, which callers treat as "no output frame".
    """
    return (length - kernel) // stride + 1
