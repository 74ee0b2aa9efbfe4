"""The ``cuda`` backend of ``attention`` and ``feature_extractor`` (kernels in ``csrc/cuda``).

Importing this module registers both implementations with :mod:`unispeech_fast.dispatch`; it never
loads the compiled extension (that happens in :mod:`unispeech_fast._extension`, on first use) and
imports cleanly on machines without CUDA or without the extension, where every call reports itself
unsupported with the reason. ``pos_conv`` and ``gumbel_quantizer`` register their ``cuda`` backends
elsewhere.

The CUDA kernels were written on a machine without a GPU: they are compile-checked for sm_80 and
sm_90 by ``scripts/check_cuda.py`` and compared with the eager references by the ``gpu``-marked tests
in ``tests/test_cuda_ops.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import _extension, dispatch
from .attention import mask_lengths, padding_mask_reasons

__all__ = ["attention_cuda", "feature_extractor_cuda"]

_ATTENTION_HEAD_DIMS = (64, 128)
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
_FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NO_BACKWARD = "the CUDA attention has no backward; the triton backend serves training"


def _extension_reasons() -> list[str]:
    _, _, has_cuda, cuda_reason = _extension.summary()
    return [] if has_cuda else [f"CUDA extension not available: {cuda_reason}"]


def _ops():
    """``torch.ops.unispeech_fast`` after loading the extension (raises if it has no CUDA kernels)."""
    _, _, has_cuda, cuda_reason = _extension.summary()
    if not has_cuda:
        raise dispatch.BackendNotSupportedError(f"CUDA extension not available: {cuda_reason}")
    return torch.ops.unispeech_fast


# ---------------------------------------------------------------------------------------------- attention
def _attention_reasons(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
) -> list[str]:
    reasons = _extension_reasons()
    tensors = {"q": q, "k": k, "v": v}
    if any(t.device.type != "cuda" for t in tensors.values()):
        reasons.append("q, k and v must be CUDA tensors, got " + ", ".join(t.device.type for t in tensors.values()))
    if q.dtype not in _ATTENTION_DTYPES:
        reasons.append(f"the CUDA attention runs float16/bfloat16 (tensor cores), got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        reasons.append(f"q, k and v must be [batch, frames, heads, head_dim] of one shape, got "
                       f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    elif q.shape[-1] not in _ATTENTION_HEAD_DIMS:
        reasons.append(f"the CUDA attention supports head_dim {_ATTENTION_HEAD_DIMS}, got {q.shape[-1]}")
    if any(t.dim() > 0 and t.stride(-1) != 1 for t in tensors.values()):
        reasons.append("q, k and v need a contiguous last dim")
    if need_weights:
        reasons.append("the CUDA attention does not return the attention probabilities (need_weights=True)")
    if dropout_p > 0.0:
        reasons.append(f"the CUDA attention has no dropout, got dropout_p={dropout_p}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        reasons.append(_NO_BACKWARD)
    if head_mask is not None:
        if head_mask.dim() != 1 or q.dim() != 4 or head_mask.shape[0] != q.shape[2]:
            reasons.append(f"head_mask must be [heads], got {tuple(head_mask.shape)}")
        if torch.is_grad_enabled() and head_mask.requires_grad:
            reasons.append("head_mask requires grad, but " + _NO_BACKWARD)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or q.dim() != 4 or key_padding_mask.shape != q.shape[:2]:
            reasons.append(f"key_padding_mask must be bool [batch, frames], got {key_padding_mask.dtype} "
                           f"{tuple(key_padding_mask.shape)}")
        elif not reasons and not torch.compiler.is_compiling():
            # Data-dependent (host syncs); under torch.compile the models' guarantee is relied on, and a row
            # without valid keys still gets the reference's uniform attention from the kernel.
            reasons.extend(padding_mask_reasons(key_padding_mask))
    return reasons


@dispatch.register("attention", "cuda", not_supported_reasons=_attention_reasons)
def attention_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
) -> tuple[torch.Tensor, None]:
    """Flash-attention forward (``torch.ops.unispeech_fast.attention_fwd``); inference only.

    ``out = head_mask[h] * softmax(scale q k^T + mask) v`` with the key padding given as lengths (the
    mask must be right-padded). Dispatch refuses a row whose keys are all padded; the kernel itself
    gives such a row the reference's uniform attention over every key. Returns ``(out, None)``.
    """
    # Dispatch checked the mask is right-padded (_attention_reasons), so its row sums are the lengths.
    seqlens = None if key_padding_mask is None else mask_lengths(key_padding_mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out = _ops().attention_fwd(q, k, v, seqlens, head_mask, float(scale))
    return out, None


# ---------------------------------------------------------------------------------------------- feature extractor
def layer0_smem_bytes(channels: int, kernel: int, stride: int, norm_type: str | None) -> int:
    """Dynamic shared memory (bytes) of the CUDA layer-0 kernel for this shape: the formula of
    ``csrc/cuda/conv_norm_gelu.cu`` (keep the two in step). ``norm_type`` ``"group"`` runs the group-norm
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


def _feature_extractor_reasons(
    x: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor | None],
    norm_weights: Sequence[torch.Tensor | None],
    norm_biases: Sequence[torch.Tensor | None],
    conv_strides: Sequence[int],
    norm_type: str,
    activation: str = "gelu",
    eps: float = 1e-5,
) -> list[str]:
    reasons = _extension_reasons()
    if x.device.type != "cuda":
        reasons.append(f"x must be a CUDA tensor, got {x.device.type}")
    if x.dtype not in _FEATURE_DTYPES:
        reasons.append(f"the CUDA feature extractor runs float32/float16/bfloat16, got {x.dtype}")
    if activation != "gelu":
        reasons.append(f"the CUDA feature extractor fuses exact GELU only, got activation={activation!r}")
    if norm_type not in ("group", "layer"):
        reasons.append(f"norm_type must be 'group' or 'layer', got {norm_type!r}")
    if x.dim() != 2:
        reasons.append(f"x must be a waveform [batch, samples], got shape {tuple(x.shape)}")
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


@dispatch.register("feature_extractor", "cuda", not_supported_reasons=_feature_extractor_reasons)
def feature_extractor_cuda(
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
    """The conv feature extractor with layer 0 as one CUDA kernel; inference only.

    Only layer 0 (one input channel: conv -> GroupNorm/LayerNorm/none -> exact GELU) is a custom kernel,
    ``torch.ops.unispeech_fast.conv_norm_gelu_fwd``; the other layers (512 input channels) run torch's
    ``conv1d`` (cuDNN), ``group_norm``/``layer_norm`` and ``gelu``, exactly as the eager reference does.
    """
    gamma, beta = norm_weights[0], norm_biases[0]
    norm_kind = 0 if gamma is None else (1 if norm_type == "group" else 2)
    h = _ops().conv_norm_gelu_fwd(
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
