"""The ``cpp`` and ``cuda`` backends of ``feature_extractor``.

* ``cpp`` (CPU tensors): one ``torch.ops.unispeech_fast.conv_norm_gelu_fwd`` call per layer (fused conv, norm
  and GELU; ``csrc/cpu/feature_extractor.cpp``). Gradients come from recomputing each layer eagerly in the
  backward (activation-checkpoint style: the compiled forward has no hand-written backward).
* ``cuda`` (CUDA tensors, inference only): layer 0 as the CUDA kernel (``csrc/cuda/feature_extractor.cu``),
  the other layers torch's cuDNN ops, exactly as the reference.

The fake and the autograd formula of ``conv_norm_gelu_fwd`` are registered when the extension loads
(:func:`unispeech_fast.ops._extension_ops.on_load`); importing this module loads nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .._extension_ops import _ops, cuda_ops, on_load
from .common import NormKind, conv_output_length

__all__ = ["CUDA_DTYPES", "conv_norm_gelu_eager", "feature_extractor_cuda", "feature_extractor_ext"]

#: What the CUDA layer-0 kernel runs (csrc/cuda/feature_extractor.cu).
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@on_load("conv_norm_gelu_fwd")
def _register() -> None:
    @torch.library.register_fake("unispeech_fast::conv_norm_gelu_fwd")
    def _(x, weight, bias, norm_weight, norm_bias, stride, norm_kind, eps):
        torch._check(x.dim() == 3, lambda: f"conv_norm_gelu_fwd: x must be [B, C_in, T], got {tuple(x.shape)}")
        frames = conv_output_length(x.shape[2], weight.shape[2], stride)
        return x.new_empty((x.shape[0], weight.shape[0], frames))

    torch.library.register_autograd("unispeech_fast::conv_norm_gelu_fwd", _cng_backward, setup_context=_cng_setup)


def conv_norm_gelu_eager(x, weight, bias, norm_weight, norm_bias, stride: int, norm_kind: int, eps: float):
    """The eager math of ``conv_norm_gelu_fwd`` (used for its backward by recomputation)."""
    h = F.conv1d(x, weight, bias, stride=stride)
    if norm_kind == NormKind.GROUP:
        h = F.group_norm(h, h.shape[1], norm_weight, norm_bias, eps)
    elif norm_kind == NormKind.LAYER:
        h = F.layer_norm(h.transpose(-2, -1), (h.shape[1],), norm_weight, norm_bias, eps).transpose(-2, -1)
    return F.gelu(h)


def _cng_setup(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, stride, norm_kind, eps = inputs
    ctx.stride, ctx.norm_kind, ctx.eps = stride, norm_kind, eps
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias)


def _cng_backward(ctx, grad_out):
    """No hand-written backward: recompute the layer with eager torch ops under autograd (activation
    checkpointing) and return their gradients."""
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(saved, needs)]
        y = conv_norm_gelu_eager(*leaves, ctx.stride, ctx.norm_kind, ctx.eps)
        wanted = [t for t, n in zip(leaves, needs) if t is not None and n]
        grads = iter(torch.autograd.grad(y, wanted, grad_out) if wanted else ())
    out = [next(grads) if (t is not None and n) else None for t, n in zip(leaves, needs)]
    return (*out, None, None, None)


def _argument_reasons(x, norm_type, activation, backend: str) -> list[str]:
    """The rules the cpp and cuda backends share: exact GELU, a group or layer norm, x a ``[batch, samples]``
    waveform. ``backend`` names the backend in the activation reason."""
    reasons = []
    if activation != "gelu":
        reasons.append(f"{backend} fuses exact GELU only, got activation={activation!r}")
    if norm_type not in ("group", "layer"):
        reasons.append(f"norm_type must be 'group' or 'layer', got {norm_type!r}")
    if x.dim() != 2:
        reasons.append(f"x must be a waveform [batch, samples], got shape {tuple(x.shape)}")
    return reasons


# ---------------------------------------------------------------------------------------------- cpp
def _feature_cpp_reasons(
    x, conv_weights, conv_biases, norm_weights, norm_biases, conv_strides, norm_type, activation="gelu", eps=1e-5
) -> list[str]:
    reasons = _argument_reasons(x, norm_type, activation, "the C++ feature extractor")
    n = len(conv_weights)
    if not (len(conv_biases) == len(norm_weights) == len(norm_biases) == len(conv_strides) == n):
        reasons.append("conv_weights, conv_biases, norm_weights, norm_biases and conv_strides must have one entry per layer")
        return reasons
    for i in range(n):
        tensors = [conv_weights[i], conv_biases[i], norm_weights[i], norm_biases[i]]
        if any(t is not None and t.dtype != x.dtype for t in tensors):
            reasons.append(f"layer {i}: parameters must have the dtype of x ({x.dtype})")
        if (norm_weights[i] is None) != (norm_biases[i] is None):
            reasons.append(f"layer {i}: a norm needs both weight and bias")
    return reasons


def feature_extractor_ext(
    x, conv_weights, conv_biases, norm_weights, norm_biases, conv_strides, norm_type, activation="gelu", eps=1e-5
):
    """The conv feature extractor as one ``conv_norm_gelu_fwd`` call per layer (fused conv, norm and
    GELU). Gradients come from recomputing each layer eagerly in the backward (see module docstring)."""
    ops = _ops()
    h = x[:, None]
    for w, b, gamma, beta, stride in zip(conv_weights, conv_biases, norm_weights, norm_biases, conv_strides):
        kind = int(NormKind.of(norm_type, gamma is not None))
        h = ops.conv_norm_gelu_fwd(h.contiguous(), w.contiguous(), b, gamma, beta, int(stride), kind, float(eps))
    return h



# ---------------------------------------------------------------------------------------------- cuda
def layer0_smem_bytes(channels: int, kernel: int, stride: int, norm_type: str | None) -> int:
    """Dynamic shared memory (bytes) of the CUDA layer-0 kernel for this shape: the formula of
    ``csrc/cuda/feature_extractor.cu`` (keep the two in step). ``norm_type`` ``"group"`` runs the group-norm
    kernels (the larger of the stats/apply passes), anything else the frames kernel."""
    if norm_type == "group":
        return 4 * ((1023 * stride + kernel) + 16 * kernel + 3 * 16)
    return 4 * ((31 * stride + kernel) + channels * (kernel + 3) + 8 * 32 * 3 + 32 * 2)


def layer0_smem_reasons(weight_shape: tuple, stride: int, norm_type: str | None, limit: int) -> list[str]:
    """Why the CUDA layer-0 kernel cannot run weight ``[C_out, 1, K]`` with ``stride`` within ``limit`` bytes."""
    need = layer0_smem_bytes(weight_shape[0], weight_shape[2], stride, norm_type)
    if need <= limit:
        return []
    return [f"layer 0 weight {weight_shape} with stride {stride} needs {need} bytes of shared memory in the CUDA "
            f"kernel; this device allows {limit}"]


def _smem_limit(device: torch.device) -> int:
    """The device's opt-in maximum of shared memory per block (bytes)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def _cuda_reasons(
    x, conv_weights, conv_biases, norm_weights, norm_biases, conv_strides, norm_type, activation="gelu", eps=1e-5
):
    reasons = []
    if x.device.type != "cuda":  # the device check names x (its wording is pinned by tests)
        reasons.append(f"x must be a CUDA tensor, got {x.device.type}")
    reasons += _argument_reasons(x, norm_type, activation, "the CUDA feature extractor")
    if not conv_weights:
        reasons.append("no conv layers given")
    else:
        w0 = conv_weights[0]
        if w0.dim() != 3 or w0.shape[1] != 1:
            reasons.append(f"layer 0 weight must be [C_out, 1, K], got {tuple(w0.shape)}")
        elif w0.shape[2] > 64 or w0.shape[0] > 2048 or not 1 <= conv_strides[0] <= 64:
            reasons.append(f"layer 0 must have K <= 64, C_out <= 2048 and stride 1..64, got weight "
                           f"{tuple(w0.shape)}, stride {conv_strides[0]}")
        elif x.device.type == "cuda" and not reasons:
            reasons.extend(layer0_smem_reasons(tuple(w0.shape), conv_strides[0],
                                               norm_type if norm_weights[0] is not None else None,
                                               _smem_limit(x.device)))
        if (norm_weights[0] is None) != (norm_biases[0] is None):
            reasons.append("layer 0 norm weight and bias must both be given or both be None")
        layer0 = [w0, conv_biases[0], norm_weights[0], norm_biases[0]]
        if any(t is not None and t.dtype != x.dtype for t in layer0):
            reasons.append(f"layer 0 parameters must have the dtype of x ({x.dtype})")
        if x.dim() == 2 and w0.dim() == 3 and x.shape[-1] < w0.shape[-1]:
            reasons.append(f"x has {x.shape[-1]} samples, fewer than the kernel size {w0.shape[-1]}")
    if torch.is_grad_enabled():
        params = [x, *conv_weights, *conv_biases, *norm_weights, *norm_biases]
        if any(t is not None and t.requires_grad for t in params):
            reasons.append("the CUDA feature extractor has no backward; the triton backend serves training")
    return reasons


def feature_extractor_cuda(
    x, conv_weights, conv_biases, norm_weights, norm_biases, conv_strides, norm_type, activation="gelu", eps=1e-5
):
    """The conv feature extractor with layer 0 as one CUDA kernel; inference only.

    Only layer 0 (one input channel: conv -> GroupNorm/LayerNorm/none -> exact GELU) is a custom kernel,
    ``torch.ops.unispeech_fast.conv_norm_gelu_fwd``; the other layers (512 input channels) run torch's
    ``conv1d`` (cuDNN), ``group_norm``/``layer_norm`` and ``gelu``, exactly as the eager reference does.
    """
    gamma, beta = norm_weights[0], norm_biases[0]
    norm_kind = int(NormKind.of(norm_type, gamma is not None))
    h = cuda_ops().conv_norm_gelu_fwd(
        x[:, None], conv_weights[0], conv_biases[0], gamma, beta, int(conv_strides[0]), norm_kind, float(eps)
    )
    for i in range(1, len(conv_weights)):
        h = F.conv1d(h, conv_weights[i], conv_biases[i], stride=conv_strides[i])
        gamma, beta = norm_weights[i], norm_biases[i]
        if gamma is not None:
            if norm_type == "group":
                h = F.group_norm(h, h.shape[1], gamma, beta, eps)
            else:
                h = F.layer_norm(h.transpose(-2, -1), (h.shape[1],), gamma, beta, eps).transpose(-2, -1)
        h = F.gelu(h)
    return h
