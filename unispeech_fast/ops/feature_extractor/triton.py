"""The ``triton`` backend of ``feature_extractor``: one custom op per conv layer (forward) and one for
its VJP (``unispeech_fast::triton_feature_extractor_layer`` / ``_backward``), and the dispatch entry."""

from __future__ import annotations

from typing import Sequence

import torch

from .._triton_common import device_guard
from .common import MAX_LAYER_NORM_CHANNELS, NormKind, conv_output_length  # the kernels' limit: no triton import

# One custom op per conv layer (forward) and one for its VJP, so the stack composes with autograd and
# torch.compile. The kernels (unispeech_fast.kernels.feature_extractor) are imported lazily: importing
# unispeech_fast never imports triton. The ``norm`` argument is the shared code (:class:`.common.NormKind`).
#: What the kernels run (``kernels/feature_extractor.py``).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from ...kernels import feature_extractor as kernels  # imports triton

    return kernels


@torch.library.custom_op("unispeech_fast::triton_feature_extractor_layer", mutates_args=())
def _triton_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    stride: int,
    norm: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused layer ``gelu(norm(conv1d(x, weight, bias, stride)))``: returns ``(y, stat0, stat1)``.

    ``x [B, C_in, L]``; the statistics (fp32) are the norm's mean and rstd (``[B, T]`` for layer norm,
    ``[B, C_out]`` for group norm, empty without a norm) that the backward reuses.
    """
    with device_guard(x.device):
        return _kernels().layer_forward(x, weight, bias, norm_weight, norm_bias, stride, norm, eps)


@_triton_layer.register_fake
def _(x, weight, bias, norm_weight, norm_bias, stride, norm, eps):
    B, _, L = x.shape
    C_out, _, K = weight.shape
    T = conv_output_length(L, K, stride)
    y = x.new_empty((B, C_out, T))
    if norm == NormKind.LAYER:
        shape = (B, T)
    elif norm == NormKind.GROUP:
        shape = (B, C_out)
    else:
        shape = (0,)
    return y, x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("unispeech_fast::triton_feature_extractor_layer_backward", mutates_args=())
def _triton_layer_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    stat0: torch.Tensor,
    stat1: torch.Tensor,
    stride: int,
    norm: int,
    need_input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """VJP of one layer: ``(grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias)``.

    Tensors for absent inputs (no bias, no norm, ``need_input_grad=False``) come back empty.
    """
    with device_guard(x.device):
        dx, dw, db, dg, dbeta = _kernels().layer_backward(
            grad_y, x, weight, bias, norm_weight, norm_bias, stat0, stat1, stride, norm, need_input_grad
        )
    empty = x.new_empty(0)
    return (
        dx if dx is not None else empty,
        dw.to(weight.dtype),
        db.to(bias.dtype) if bias is not None else empty.clone(),
        dg.to(norm_weight.dtype) if norm_weight is not None else empty.clone(),
        dbeta.to(norm_bias.dtype) if norm_bias is not None else empty.clone(),
    )


@_triton_layer_backward.register_fake
def _(grad_y, x, weight, bias, norm_weight, norm_bias, stat0, stat1, stride, norm, need_input_grad):
    def like(t, cond):
        return torch.empty_like(t) if cond else x.new_empty(0)

    return (
        like(x, need_input_grad),
        torch.empty_like(weight),
        like(bias, bias is not None),
        like(norm_weight, norm_weight is not None),
        like(norm_bias, norm_bias is not None),
    )


def _triton_layer_setup_context(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, stride, norm, _eps = inputs
    _, stat0, stat1 = output
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias, stat0, stat1)
    ctx.stride, ctx.norm = stride, norm


def _triton_layer_autograd(ctx, grad_y, _grad_stat0, _grad_stat1):
    x, weight, bias, norm_weight, norm_bias, stat0, stat1 = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db, dg, dbeta = torch.ops.unispeech_fast.triton_feature_extractor_layer_backward(
        grad_y.contiguous(), x, weight, bias, norm_weight, norm_bias, stat0, stat1, ctx.stride, ctx.norm, need[0]
    )
    return (
        dx if need[0] else None,
        dw if need[1] else None,
        db if bias is not None and need[2] else None,
        dg if norm_weight is not None and need[3] else None,
        dbeta if norm_bias is not None and need[4] else None,
        None,
        None,
        None,
    )


_triton_layer.register_autograd(_triton_layer_autograd, setup_context=_triton_layer_setup_context)


def _triton_not_supported_reasons(
    x, conv_weights, conv_biases, norm_weights, norm_biases, conv_strides, norm_type, activation="gelu", eps=1e-5
) -> list[str]:
    reasons: list[str] = []
    if activation != "gelu":
        reasons.append(f"the triton feature extractor fuses only exact 'gelu', got activation={activation!r}")
    if norm_type not in ("group", "layer"):
        reasons.append(f"norm_type must be 'group' or 'layer', got {norm_type!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        reasons.append(f"x must be a waveform [batch, samples], got shape {tuple(getattr(x, 'shape', ()))}")
        return reasons
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        reasons.append("bfloat16 is not supported by the Triton interpreter (CPU tensors); use a GPU")
    n = len(conv_weights)
    if not (len(conv_biases) == len(norm_weights) == len(norm_biases) == len(conv_strides) == n) or n == 0:
        reasons.append("conv_weights, conv_biases, norm_weights, norm_biases and conv_strides must have the "
                       f"same non-zero length, got {len(conv_weights)}, {len(conv_biases)}, {len(norm_weights)}, "
                       f"{len(norm_biases)}, {len(conv_strides)}")
        return reasons
    c_in, length = 1, x.shape[1]
    for i in range(n):
        w, b, g, beta, s = conv_weights[i], conv_biases[i], norm_weights[i], norm_biases[i], conv_strides[i]
        if w.dim() != 3 or w.shape[1] != c_in:
            reasons.append(f"conv_weights[{i}] must be [C_out, {c_in}, kernel], got {tuple(w.shape)}")
            return reasons
        tensors = [("conv_weights", w), ("conv_biases", b), ("norm_weights", g), ("norm_biases", beta)]
        for name, t in tensors:
            if t is None:
                continue
            if t.dtype != x.dtype or t.device != x.device:
                reasons.append(f"{name}[{i}] is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
            if name != "conv_weights" and tuple(t.shape) != (w.shape[0],):
                reasons.append(f"{name}[{i}] must have shape ({w.shape[0]},), got {tuple(t.shape)}")
        if (g is None) != (beta is None):
            reasons.append(f"norm_weights[{i}] and norm_biases[{i}] must both be given or both be None")
        if g is not None and norm_type == "layer" and w.shape[0] > MAX_LAYER_NORM_CHANNELS:
            reasons.append(f"layer norm over {w.shape[0]} channels (layer {i}); the triton kernel holds at "
                           f"most {MAX_LAYER_NORM_CHANNELS} channels per frame")
        if not isinstance(s, int) or s < 1:
            reasons.append(f"conv_strides[{i}] must be a positive int, got {s!r}")
            return reasons
        length = conv_output_length(length, w.shape[2], s)
        if length < 1:
            reasons.append(f"{x.shape[1]} samples are fewer than the receptive field (layer {i} has no output frame)")
            return reasons
        c_in = w.shape[0]
    return reasons


def feature_extractor_triton(
    x, conv_weights, conv_biases, norm_weights, norm_biases, conv_strides, norm_type, activation="gelu", eps=1e-5
):
    """Triton backend: one fused Triton layer per conv (implicit-GEMM conv, bias, norm, exact gelu).

    Forward and backward are Triton kernels (``unispeech_fast.kernels.feature_extractor``, conv backward included);
    each layer saves only its input and the norm statistics, and the backward recomputes the conv.
    """
    h = x[:, None, :]
    for i, w in enumerate(conv_weights):
        norm = int(NormKind.of(norm_type, norm_weights[i] is not None))
        h = torch.ops.unispeech_fast.triton_feature_extractor_layer(
            h, w, conv_biases[i], norm_weights[i], norm_biases[i], int(conv_strides[i]), norm, float(eps)
        )[0]
    return h
