"""Exact, time-tiled conv feature extraction for long audio.

The conv stack has no padding, so output frames ``[t0, t1)`` of the last layer depend only on input
samples ``[t0 * S, (t1 - 1) * S + R)`` (``S`` the product of the strides, ``R`` the receptive field):
each tile is computed from its slice of the waveform plus that halo, and no full-length intermediate
activation exists. Layer-norm stacks have no other cross-time dependency, so each tile goes through
:func:`unispeech_fast.ops.feature_extractor` on the current backend. The group-norm stack (base
checkpoints) normalises layer 0 per channel over the whole time axis: a first pass gathers those
statistics tile by tile (per-tile mean and M2 in fp32, or fp64 for fp64 input, from ``torch.var_mean``,
merged across tiles in fp64 with Chan's formula). With the statistics known, layer 0's group norm is a
per-channel affine map, which folds into layer 0's conv (weight times ``gamma / std``, bias shifted);
the second pass then runs every tile through :func:`unispeech_fast.ops.feature_extractor` as a stack
with no norm, on the current backend, one batch row at a time since each row has its own statistics.

Peak memory is the output plus one tile's activations, instead of every layer's full-length output.
The result equals the untiled extractor to float tolerance (the group-norm statistics are summed in a
different order).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import ops
from .ops.feature_extractor.common import conv_output_length

__all__ = ["output_frames", "input_span", "tiled_feature_extractor"]


def output_frames(num_samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Frames the conv stack yields for ``num_samples`` input samples (0 when too short)."""
    length = num_samples
    for kernel, stride in zip(kernels, strides):
        length = conv_output_length(length, kernel, stride)
        if length <= 0:
            return 0
    return length


def input_span(first: int, last: int, kernels: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
    """The input range ``[start, stop)`` that output frames ``[first, last)`` of the stack depend on."""
    for kernel, stride in zip(reversed(kernels), reversed(strides)):
        first, last = first * stride, (last - 1) * stride + kernel
    return first, last


def _layer0_stats(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, tile: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, channel) mean and 1/std of layer 0's conv output over all its frames, tile by tile."""
    kernel = weight.shape[-1]
    frames = conv_output_length(x.shape[-1], kernel, stride)
    acc = torch.promote_types(x.dtype, torch.float32)
    count = torch.zeros((), dtype=torch.float64)
    mean = m2 = None
    for first in range(0, frames, tile):
        last = min(first + tile, frames)
        h = F.conv1d(x[:, None, first * stride:(last - 1) * stride + kernel], weight, bias, stride=stride)
        var_t, mean_t = torch.var_mean(h.to(acc), dim=-1, unbiased=False)
        n_t = float(last - first)
        var_t, mean_t = var_t.double(), mean_t.double()
        if mean is None:
            mean, m2, count = mean_t, var_t * n_t, torch.tensor(n_t, dtype=torch.float64)
            continue
        total = count + n_t
        delta = mean_t - mean
        mean = mean + delta * (n_t / total)
        m2 = m2 + var_t * n_t + delta.square() * (count * n_t / total)
        count = total
    var = m2 / count
    return mean.to(acc), torch.rsqrt(var.to(acc) + eps)


def tiled_feature_extractor(
    x: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor | None],
    norm_weights: Sequence[torch.Tensor | None],
    norm_biases: Sequence[torch.Tensor | None],
    conv_strides: Sequence[int],
    norm_type: str,
    activation: str = "gelu",
    eps: float = 1e-5,
    tile_frames: int = 256,
) -> torch.Tensor:
    """:func:`unispeech_fast.ops.feature_extractor`, computed ``tile_frames`` output frames at a time.

    Arguments as for :func:`unispeech_fast.ops.feature_extractor_ref`, plus ``tile_frames`` (output
    frames per tile, >= 1). Meant for inference: it works under autograd too, but saves no memory there.
    """
    if not isinstance(tile_frames, int) or tile_frames < 1:
        raise ValueError(f"tile_frames must be a positive int, got {tile_frames!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be a waveform [batch, samples], got shape {tuple(x.shape)}")
    kernels = [w.shape[-1] for w in conv_weights]
    strides = list(conv_strides)
    frames = output_frames(x.shape[-1], kernels, strides)
    if frames == 0:
        raise ValueError(f"x has {x.shape[-1]} samples, fewer than the receptive field {input_span(0, 1, kernels, strides)[1]}")
    channels = conv_weights[-1].shape[0]
    out = x.new_empty(x.shape[0], channels, frames)
    group = norm_type == "group" and norm_weights[0] is not None
    if group:
        per_frame = 1
        for s in strides[1:]:
            per_frame *= s  # layer-0 frames per output frame
        mean, rstd = _layer0_stats(x, conv_weights[0], conv_biases[0], strides[0], tile_frames * per_frame, eps)
        gamma, beta = norm_weights[0].to(rstd.dtype), norm_biases[0].to(rstd.dtype)
        # GN(conv(x, w) + b) = conv(x, w * s) + (b * s + shift), s = gamma / std, shift = beta - mean * s:
        # per (batch row, channel), computed in the statistics' precision and rounded once to x's dtype.
        scale = rstd * gamma
        shift = beta - mean * scale
        if conv_biases[0] is not None:
            shift = shift + conv_biases[0].to(scale.dtype) * scale
        w0 = conv_weights[0].to(scale.dtype)
        layer0 = [((w0 * scale[row, :, None, None]).to(x.dtype), shift[row].to(x.dtype)) for row in range(x.shape[0])]
        no_norm = [None] * len(conv_weights)
    for first in range(0, frames, tile_frames):
        last = min(first + tile_frames, frames)
        start, stop = input_span(first, last, kernels, strides)
        piece = x[:, start:stop]
        if not group:
            out[:, :, first:last] = ops.feature_extractor(
                piece, conv_weights, conv_biases, norm_weights, norm_biases, strides, norm_type, activation, eps
            )
            continue
        for row, (weight0, bias0) in enumerate(layer0):
            out[row:row + 1, :, first:last] = ops.feature_extractor(
                piece[row:row + 1], [weight0, *conv_weights[1:]], [bias0, *conv_biases[1:]], no_norm, no_norm,
                strides, norm_type, activation, eps,
            )
    return out
