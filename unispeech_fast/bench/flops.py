"""Explicit FLOP and byte counts for the benchmarked ops and models, and a table of device peaks.

Conventions (FlashAttention's, so our TFLOP/s compare with published numbers):

* A multiply-add counts as 2 FLOPs; element-wise work (norms, activations, softmax, bias) is not counted.
* ``conv1d``: ``2 * B * C_out * (C_in / groups) * K * T_out`` forward. Its backward computes the input
  gradient and the weight gradient, each as much work as the forward: ``2x`` forward, or ``1x`` where the
  input needs no gradient (the waveform into the first feature-extractor layer).
* attention (non-causal): ``4 * B * H * N^2 * D`` forward (``Q K^T`` and ``P V``), backward ``2.5x``
  forward (five ``N^2 D`` products instead of two).
* Linear layers: ``2 * tokens * in * out`` forward, backward ``2x`` forward.
* Bytes are the minimum traffic to and from device memory: every input read once, every output written
  once (intermediates that a fused kernel keeps on chip are not counted).

Modes: ``"fwd"``, ``"bwd"`` (backward only, with the forward graph already built) and ``"fwd_bwd"``.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..ops.feature_extractor.common import conv_output_length

__all__ = [
    "MODES",
    "DEVICE_PEAKS",
    "device_peak",
    "conv1d_flops",
    "attention_flops",
    "attention_bytes",
    "pos_conv_flops",
    "pos_conv_bytes",
    "feature_extractor_flops",
    "feature_extractor_bytes",
    "gumbel_quantizer_bytes",
    "model_flops",
]

MODES = ("fwd", "bwd", "fwd_bwd")

# (name pattern, {dtype: dense TFLOP/s}, HBM TB/s). Checked in order against the lower-cased device name.
# fp32 is the CUDA-core FMA peak: runs that use TF32 tensor cores can exceed 100% of it.
DEVICE_PEAKS: tuple[tuple[str, dict[str, float], float], ...] = (
    (r"h100.*pcie", {"float16": 756.0, "bfloat16": 756.0, "float32": 51.0}, 2.0),
    (r"h100", {"float16": 989.4, "bfloat16": 989.4, "float32": 67.0}, 3.35),
    (r"h200", {"float16": 989.4, "bfloat16": 989.4, "float32": 67.0}, 4.8),
    (r"a100", {"float16": 312.0, "bfloat16": 312.0, "float32": 19.5}, 2.0),
)


def device_peak(device_name: str, dtype: str) -> tuple[float | None, float | None]:
    """``(peak TFLOP/s for dtype, peak TB/s)`` of a device named ``device_name``; None where unknown (CPU)."""
    name = device_name.lower()
    for pattern, tflops, tbps in DEVICE_PEAKS:
        if re.search(pattern, name):
            return tflops.get(dtype.replace("torch.", "")), tbps
    return None, None


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _scale(fwd: float, bwd: float, mode: str) -> float:
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[_check_mode(mode)]


def conv1d_flops(batch: int, c_in: int, c_out: int, kernel: int, t_out: int, groups: int = 1) -> int:
    """Forward FLOPs of one conv1d: ``2 * B * C_out * (C_in / groups) * K * T_out``."""
    if c_in % groups:
        raise ValueError(f"c_in ({c_in}) must be divisible by groups ({groups})")
    return 2 * batch * c_out * (c_in // groups) * kernel * t_out


def attention_flops(batch: int, heads: int, frames: int, head_dim: int, mode: str = "fwd") -> float:
    """``4 * B * H * N^2 * D`` forward, ``2.5x`` that backward."""
    fwd = 4 * batch * heads * frames * frames * head_dim
    return _scale(fwd, 2.5 * fwd, mode)


def attention_bytes(batch: int, heads: int, frames: int, head_dim: int, elt: int, mode: str = "fwd") -> float:
    """Forward reads q, k, v and writes out (4 tensors); backward reads q, k, v, out, d_out and writes
    dq, dk, dv (8 tensors). Each tensor is ``B * N * H * D`` elements of ``elt`` bytes."""
    one = batch * frames * heads * head_dim * elt
    return _scale(4 * one, 8 * one, mode)


def linear_flops(tokens: int, k: int, n: int, mode: str = "fwd") -> float:
    """``2 * tokens * K * N`` forward; backward computes the input and weight gradients (``2x``)."""
    fwd = 2 * tokens * k * n
    return _scale(fwd, 2 * fwd, mode)


def linear_bytes(tokens: int, k: int, n: int, elt: int, mode: str = "fwd") -> float:
    """Forward reads x ``[tokens, K]`` and W ``[N, K]`` and writes y ``[tokens, N]``; backward reads
    d_y, x and W and writes d_x and d_W."""
    x, w, y = tokens * k * elt, n * k * elt, tokens * n * elt
    return _scale(x + w + y, y + x + w + x + w, mode)


def pos_conv_flops(batch: int, frames: int, hidden: int, groups: int, kernel: int, mode: str = "fwd") -> float:
    """The grouped positional conv (same-length output): forward one conv, backward input + weight grads."""
    fwd = conv1d_flops(batch, hidden, hidden, kernel, frames, groups)
    return _scale(fwd, 2 * fwd, mode)


def pos_conv_bytes(batch: int, frames: int, hidden: int, groups: int, kernel: int, elt: int,
                   mode: str = "fwd") -> float:
    """Forward reads x and the weight, writes the output; backward reads d_out, x and the weight, writes
    dx and the weight gradient."""
    act = batch * frames * hidden * elt
    weight = hidden * (hidden // groups) * kernel * elt
    return _scale(2 * act + weight, 3 * act + 2 * weight, mode)


def _fe_layers(samples: int, conv_dim: Sequence[int], conv_kernel: Sequence[int], conv_stride: Sequence[int]):
    c_in, length = 1, samples
    for c_out, kernel, stride in zip(conv_dim, conv_kernel, conv_stride):
        t_out = conv_output_length(length, kernel, stride)
        yield c_in, c_out, kernel, length, t_out
        c_in, length = c_out, t_out


def feature_extractor_flops(batch: int, samples: int, conv_dim: Sequence[int], conv_kernel: Sequence[int],
                            conv_stride: Sequence[int], mode: str = "fwd") -> float:
    """Sum of the conv layers. Backward: weight gradient for every layer, input gradient for every layer
    but the first (the waveform needs none)."""
    fwd = bwd = 0
    for i, (c_in, c_out, kernel, _, t_out) in enumerate(_fe_layers(samples, conv_dim, conv_kernel, conv_stride)):
        f = conv1d_flops(batch, c_in, c_out, kernel, t_out)
        fwd += f
        bwd += f if i == 0 else 2 * f
    return _scale(fwd, bwd, mode)


def feature_extractor_bytes(batch: int, samples: int, conv_dim: Sequence[int], conv_kernel: Sequence[int],
                            conv_stride: Sequence[int], elt: int, mode: str = "fwd") -> float:
    """Per layer (a fused layer reads its input once and writes its output once): forward input + weight +
    output; backward d_out + input + weight read, d_input (not for layer 0) + d_weight written."""
    fwd = bwd = 0
    for i, (c_in, c_out, kernel, length, t_out) in enumerate(_fe_layers(samples, conv_dim, conv_kernel, conv_stride)):
        inp, out, weight = batch * c_in * length * elt, batch * c_out * t_out * elt, c_out * c_in * kernel * elt
        fwd += inp + weight + out
        bwd += out + inp + 2 * weight + (0 if i == 0 else inp)
    return _scale(fwd, bwd, mode)


def gumbel_quantizer_bytes(batch: int, frames: int, groups: int, per_group: int, dim: int, elt: int,
                           mode: str = "fwd") -> float:
    """Memory-bound op (no FLOP count): forward reads the logits ``[B, T, G*V]`` and the codebook
    ``[G*V, D/G]``, writes ``[B, T, D]``; backward reads d_out and the logits, writes d_logits and the
    codebook gradient."""
    logits, out, book = batch * frames * groups * per_group * elt, batch * frames * dim * elt, per_group * dim * elt
    return _scale(logits + book + out, out + 2 * logits + book, mode)


def model_flops(config, batch: int, samples: int, mode: str = "inference") -> float:
    """Matmul/conv FLOPs of a UniSpeech(-SAT) ``ForCTC`` model (backbone + ``lm_head``).

    ``"inference"``: the forward. ``"finetune"``: the forward plus the backward of everything after the
    frozen feature encoder (``2x`` for linears and convs, ``2.5x`` for attention); the frozen feature
    encoder gets no backward.
    """
    if mode not in ("inference", "finetune"):
        raise ValueError(f"mode must be 'inference' or 'finetune', got {mode!r}")
    conv_dim, kernel, stride = config.conv_dim, config.conv_kernel, config.conv_stride
    fe = feature_extractor_flops(batch, samples, conv_dim, kernel, stride, "fwd")
    frames = conv_output_length(samples, kernel[0], stride[0])
    for k, s in zip(kernel[1:], stride[1:]):
        frames = conv_output_length(frames, k, s)
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = batch * frames
    proj = 2 * tokens * conv_dim[-1] * hidden
    pos = pos_conv_flops(batch, frames, hidden, config.num_conv_pos_embedding_groups,
                         config.num_conv_pos_embeddings, "fwd")
    linears = layers * (2 * tokens * hidden * hidden * 4 + 2 * tokens * hidden * inter * 2)
    attn = layers * attention_flops(batch, config.num_attention_heads, frames, hidden // config.num_attention_heads)
    head = 2 * tokens * hidden * config.vocab_size
    dense = proj + pos + linears + head
    if mode == "inference":
        return fe + dense + attn
    return fe + dense + attn + 2 * dense + 2.5 * attn
