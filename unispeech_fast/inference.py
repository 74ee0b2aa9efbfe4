"""``optimize_for_inference``: a frozen, inference-only snapshot of a model with prepacked CPU weights.

Like ``torch.jit.freeze`` or OpenVINO's compile step, :func:`optimize_for_inference` takes a snapshot on
purpose: it deep-copies the model, folds and packs what can be prepared once, and returns the copy. The
packed weights live only in that copy; the original model is not modified, and later changes to it
(``.data`` writes, ``load_state_dict``, optimizer steps) do not reach the snapshot. The default forward
path of the models keeps no derived weights at all.

What is prepared once (CPU, oneDNN as shipped inside torch):

* every encoder layer's dense layers as oneDNN matmuls (``torch.ops.mkldnn._linear_pointwise``) on
  weights reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``):
  q/k/v as one ``[3H, H]`` GEMM, the feed-forward's first layer with the GELU (or ReLU) fused as a
  post-op and, in float32, the attention output and the feed-forward's second layer with the residual
  add fused as a binary post-op; the feature projection likewise. No per-call reorder, slice or copy;
* the feature encoder (:class:`InferenceFeatureEncoder`) as the same packed matmuls in a time-major
  ``[T, C]`` layout: a conv layer is a matmul of its input windows (each a contiguous span: kernel 2 /
  stride 2 is a free view, kernel 3 / stride 2 one copy) with bias and GELU fused; the group norm's
  statistics come from the waveform windows' mean and covariance (the conv is linear), so layer 0's norm
  folds into its weight per batch row with no statistics pass over the 512-channel activations; tiles
  of 64 output frames (128 measured as fast, with 37 MiB more peak RSS at 10 s in float32), one batch
  row at a time, as in :mod:`unispeech_fast.tiling`;
* the positional conv's weight norm, folded once, and the conv as oneDNN's grouped convolution
  (``torch.ops.mkldnn._convolution_pointwise``) on a prepacked weight over the channels-last view of
  ``[B, T, H]`` (no transposes) with bias and GELU fused.

Left as in the default path: attention (through dispatch, :func:`unispeech_fast.ops.attention`: on CPU the
measured order's pick, the C++ kernel in bf16 and SDPA in fp32), LayerNorm and the task heads.

``dtype=torch.bfloat16``: the encoder's matmul inputs and weights are bfloat16 with fp32 accumulation
(oneDNN; AVX512_BF16 where the CPU has it), and so are q, k and v into attention (the C++ kernel's
bf16 path: VDPBF16PS products, fp32 softmax statistics and accumulators); LayerNorm, the residual
stream, the positional conv, the feature encoder, the feature projection and the heads stay float32.
Inputs and outputs are float32 whatever ``dtype`` is. With the C++ kernel's AVX512_BF16 microkernels
the whole bf16 snapshot ran 1.08x (10 s) and 1.10x (30 s) faster with bf16 attention than with q/k/v
upcast to float32, at the same error (4.81e-3 vs 4.83e-3 normwise, 10 s); interleaved wall-time
medians, 2 threads, loaded machine. (With the kernel's earlier BLAS path, bf16 attention had been the
slower one.) ``InferenceEncoderLayer.attention_dtype`` switches it.

Measured 2026-11-30 on the 2-core AMD EPYC development machine (AVX512_BF16 and VNNI, no AMX) while
other jobs loaded it heavily (load average 7-13), so only interleaved A/B ratios of process CPU time
at 1 thread are quoted; the lead's quiet ``benchmarks/cpu_peers.py`` run is the reference:

* against the previous snapshot (feature encoder and positional conv as on the default path),
  UniSpeechSat-base: 1.13x faster in float32 and 1.17x in bfloat16 at 10 s of audio (7 reps), 1.10x and
  1.15x at 30 s (3 reps), medians, with 128-frame feature-encoder tiles;
* the feature encoder alone: 1.28x the default path's (tiles of 64-128 frames; 256: 1.18x), about 95
  GFLOP/s on one loaded core; the positional conv alone: 1.68x (``F.conv1d`` + GELU on the transposed
  input vs the channels-last oneDNN conv), at 499 and 1499 frames;
* where the time goes now (torch.profiler, 1 thread, 10 s): float32 - feature encoder matmuls 31%,
  encoder GEMMs 51% (FFN 34%, q/k/v 13%, out-proj 5%), attention 8%, positional conv 5% (profiled
  before its oneDNN conv), copies 3%, LayerNorm < 1%; bfloat16 - feature encoder (float32) 41%, encoder GEMMs 37%,
  attention 13%, copies and casts 4%, positional conv 3%.

The bfloat16 error budget (``benchmarks/cpu_engine_bf16_budget.py``; normwise error of
``last_hidden_state`` against the float32 model, UniSpeechSat-base, random weights, 4 s; 10 s within
0.03e-3 of these): the shipped bfloat16 snapshot 4.81e-3; with the feature encoder's matmuls in
bfloat16 as well 7.56e-3 (with bf16 attention: layer 1 alone, half the encoder's FLOPs, 5.65e-3;
layers 4-6 6.36e-3), with the positional conv 4.87e-3, with the feature projection 5.42e-3, all three
7.97e-3. The encoder layers use up the 5e-3 target by themselves, so the feature encoder (which would
run about 2x faster in bfloat16) and the feature projection stay float32; the positional conv (3% of
the time) would fit only with a 1-3% margin and stays float32 too. ``benchmarks/cpu_engine_bf16_bound.py``
measures every part's error alone and bounds the fastest split within 5e-3 at the matmul peaks: on this CPU
none is as fast as OpenVINO's all-bf16 default (README, "Optimized CPU inference").

Tried and left out (same machine and load caveats):

* int8 (``torch.ao.quantization.quantize_dynamic`` of the encoder's Linear layers: int8 weights,
  dynamic per-tensor int8 activations): normwise error of ``last_hidden_state`` against the float32
  model 3.95e-2 on UniSpeechSat-base, 4 s of audio, against 4.82e-3 for ``dtype=torch.bfloat16``, and
  0.90x the bf16 snapshot's speed (quiet machine, interleaved medians;
  ``benchmarks/results/cpu_engine_bf16_budget_2026-11-30T16.json``). The issue admits int8 only if faster
  than bf16 at <= 2x its error, so it is not offered.
* the feature encoder's 512-channel layers as oneDNN convolutions (``_convolution_pointwise``,
  channels-last, GELU fused) instead of window matmuls: within noise of the matmuls in bfloat16 and
  float32 for one layer (kernel 3, 4111 frames); the matmuls take any length with one packed weight.
* LayerNorm fused with the residual add: torch ships no fused add + LayerNorm CPU op; in float32 the
  residual add is already fused into the preceding GEMM (binary post-op), leaving LayerNorm one pass
  (under 1% of the time).

Accuracy policy for this path: single ops may differ from eager by more than the per-op 2x rule (a
oneDNN matmul accumulates the whole reduction without the chunking of :mod:`unispeech_fast.ops.linear`),
but the whole model's float32 error against an fp64 run of the same model stays within 2x of the default
path's own float32 error (or that error plus two float32 roundings of the output's magnitude, where larger: a
pooled head's few logits differ by an ulp or two) (``tests/test_optimize_for_inference.py``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, tiling
from .activations import get_activation
from .ops.feature_extractor.common import conv_output_length
from .modules import (
    CONV_NORM_EPS,
    Attention,
    ConvLayer,
    EncoderLayer,
    EncoderLayerStableLayerNorm,
    FeatureEncoder,
    FeatureProjection,
    FeedForward,
    PositionalConvEmbedding,
)

__all__ = ["optimize_for_inference", "InferenceOnlyError", "PackedLinear"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16)
# Activations oneDNN fuses as an eltwise post-op, by transformers' name: (attr, algorithm).
_FUSED_ACTIVATIONS = {"gelu": ("gelu", "none"), "relu": ("relu", "")}


class InferenceOnlyError(RuntimeError):
    """Raised for anything that would train, move, cast or reload an ``optimize_for_inference`` snapshot."""


def _onednn_linear_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise.default
        torch.ops.mkldnn._reorder_linear_weight.default
        torch.ops.mkldnn._convolution_pointwise.default
        torch.ops.mkldnn._reorder_convolution_weight.default
    except (AttributeError, RuntimeError):
        return False
    return True


class PackedLinear(nn.Module):
    """``y = act(x W^T + b) [+ other]`` on a weight reordered once into oneDNN's layout.

    ``x`` ``[..., K]`` is cast to the compute dtype; the result ``[..., N]`` is in the compute dtype.
    The packed weight and the bias are plain attributes (not parameters or buffers): they are the
    snapshot, and nothing recomputes them.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 activation: str | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out_features, in_features], got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        with torch.no_grad():
            dense_weight = weight.detach().to(dtype).contiguous()
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(dense_weight)
            self.bias = None if bias is None else bias.detach().to(dtype).clone().contiguous()
        self.activation = activation
        self._attr, self._algorithm = ("none", "") if activation is None else _FUSED_ACTIVATIONS[activation]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, "
                f"activation={self.activation}")

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}], got {tuple(x.shape)}")
        return x.reshape(-1, self.in_features).to(self.dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., K]`` -> ``act(x W^T + b)`` ``[..., N]`` in the compute dtype."""
        out = torch.ops.mkldnn._linear_pointwise.default(
            self._flat(x), self.packed_weight, self.bias, self._attr, [], self._algorithm)
        return out.view(*x.shape[:-1], self.out_features)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``other + (x W^T + b)`` with the add fused as a oneDNN binary post-op (no activation).

        ``other`` ``[..., N]`` must be in the compute dtype (oneDNN's binary post-op needs one dtype).
        """
        if self.activation is not None:
            raise RuntimeError("PackedLinear.add is defined for a layer without activation")
        if other.dtype != self.dtype:
            raise TypeError(f"other must be {self.dtype} (the compute dtype), got {other.dtype}")
        flat_other = other.reshape(-1, self.out_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise.binary(
            self._flat(x), flat_other, self.packed_weight, self.bias, "add")
        return out.view(*x.shape[:-1], self.out_features)


def _fused_activation_name(name: str) -> str | None:
    return name if name in _FUSED_ACTIVATIONS else None


class InferenceEncoderLayer(nn.Module):
    """One transformer layer (post-LN or pre-LN "stable") with packed q/k/v, output and feed-forward GEMMs.

    Same arguments and returns as :class:`unispeech_fast.modules.EncoderLayer`: ``hidden_states``
    float32 ``[B, T, H]``, ``key_padding_mask`` bool ``[B, T]`` or None, ``head_mask`` ``[heads]`` or
    None; returns ``(hidden_states float32 [B, T, H], attention probabilities or None)``.
    """

    def __init__(self, layer: EncoderLayer | EncoderLayerStableLayerNorm, hidden_act: str, dtype: torch.dtype) -> None:
        super().__init__()
        attention: Attention = layer.attention
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        for name, m in zip(("q_proj", "k_proj", "v_proj", "out_proj"), projections + (attention.out_proj,)):
            if type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks:
                raise TypeError(f"optimize_for_inference packs plain nn.Linear projections; attention.{name} is "
                                f"{type(m).__name__}{' with hooks' if type(m) is nn.Linear else ''} "
                                f"(merge adapters such as LoRA into the weights first)")
        self.stable = isinstance(layer, EncoderLayerStableLayerNorm)
        self.dtype = dtype
        # The dtype q, k, v reach attention in: the compute dtype (bf16 attention measured faster at the
        # same error; see the module docstring).
        self.attention_dtype = dtype
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.qkv = PackedLinear(torch.cat([m.weight for m in projections]),
                                torch.cat([m.bias for m in projections]), dtype)
        self.out_proj = PackedLinear(attention.out_proj.weight, attention.out_proj.bias, dtype)
        ffn = layer.feed_forward
        fused = _fused_activation_name(hidden_act)
        self.intermediate = PackedLinear(ffn.intermediate_dense.weight, ffn.intermediate_dense.bias, dtype, fused)
        self.intermediate_act = None if fused is not None else get_activation(hidden_act)
        self.output_dense = PackedLinear(ffn.output_dense.weight, ffn.output_dense.bias, dtype)
        # Deep copies: the snapshot shares no tensor with the original model.
        self.layer_norm = copy.deepcopy(layer.layer_norm)
        self.final_layer_norm = copy.deepcopy(layer.final_layer_norm)
        self.adapter_layer = copy.deepcopy(getattr(layer, "adapter_layer", None))

    def _attention(self, x, key_padding_mask, head_mask, output_attentions):
        batch, frames, _ = x.shape
        qkv = self.qkv(x)
        if output_attentions or self.attention_dtype == torch.float32:
            qkv = qkv.float()  # returned probabilities come from an fp32 softmax
        q, k, v = qkv.view(batch, frames, 3, self.num_heads, self.head_dim).unbind(2)
        out, weights = ops.attention(q, k, v, key_padding_mask=key_padding_mask, head_mask=head_mask,
                                     dropout_p=0.0, scale=self.scaling, need_weights=output_attentions)
        if weights is not None:
            weights = weights.float()
        return out.reshape(batch, frames, self.num_heads * self.head_dim), weights

    def _residual(self, linear: PackedLinear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + linear(x)`` in float32 (the residual stream stays float32)."""
        if self.dtype == torch.float32:
            return linear.add(x, residual)
        return residual + linear(x)  # bf16 + fp32 promotes to fp32 in the add itself: no separate cast pass

    def _feed_forward_in(self, x: torch.Tensor) -> torch.Tensor:
        h = self.intermediate(x)
        return h if self.intermediate_act is None else self.intermediate_act(h)

    def forward(self, hidden_states, key_padding_mask=None, head_mask=None, output_attentions=False):
        if self.stable:
            attn, weights = self._attention(self.layer_norm(hidden_states), key_padding_mask, head_mask,
                                            output_attentions)
            hidden_states = self._residual(self.out_proj, attn, hidden_states)
            ff = self._feed_forward_in(self.final_layer_norm(hidden_states))
            hidden_states = self._residual(self.output_dense, ff, hidden_states)
            if self.adapter_layer is not None:
                hidden_states = hidden_states + self.adapter_layer(hidden_states)
            return hidden_states, weights
        attn, weights = self._attention(hidden_states, key_padding_mask, head_mask, output_attentions)
        hidden_states = self.layer_norm(self._residual(self.out_proj, attn, hidden_states))
        ff = self._feed_forward_in(hidden_states)
        return self.final_layer_norm(self._residual(self.output_dense, ff, hidden_states)), weights


def _window_matrix(h: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Time-major ``h`` ``[T, C]`` -> the conv's input windows ``[T', kernel * C]`` (row ``t``: frames
    ``t*stride .. t*stride+kernel-1``, frame-major). Each window is one contiguous span of ``h``, so for
    ``kernel == stride`` this is a free view; otherwise one copy (``kernel / stride`` times ``h``)."""
    h = h.contiguous()  # the windows below index the storage as [T, C] rows (a no-op for a fresh activation)
    frames, channels = h.shape
    out_frames = conv_output_length(frames, kernel, stride)
    return h.as_strided((out_frames, kernel * channels), (stride * channels, 1), h.storage_offset()).contiguous()


def _conv_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight ``[C_out, C_in, kernel]`` -> ``[C_out, kernel * C_in]`` matching :func:`_window_matrix`."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1)


def _window_moments(x: torch.Tensor, kernel: int, stride: int, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, k]`` and population covariance ``[B, k, k]`` (float64) of each row's conv windows.

    ``x`` ``[B, L]``; windows ``x[b, t*stride : t*stride+kernel]`` for every output frame ``t``. Chunks of
    ``chunk`` frames are merged with Chan's formula, so no full-length float64 copy exists.
    """
    frames = conv_output_length(x.shape[-1], kernel, stride)
    mean = cov = None
    count = 0
    for first in range(0, frames, chunk):
        last = min(first + chunk, frames)
        u = x[:, first * stride:(last - 1) * stride + kernel].unfold(-1, kernel, stride).double()
        n = last - first
        mean_c = u.mean(dim=1)
        centered = u - mean_c[:, None]
        scatter_c = centered.transpose(1, 2) @ centered
        if mean is None:
            mean, cov, count = mean_c, scatter_c, n
            continue
        total = count + n
        delta = mean_c - mean
        cov = cov + scatter_c + delta[:, :, None] * delta[:, None, :] * (count * n / total)
        mean = mean + delta * (n / total)
        count = total
    return mean, cov / count


class InferenceFeatureEncoder(nn.Module):
    """The conv feature encoder as oneDNN matmuls in a time-major ``[T, C]`` layout, tile by tile.

    A conv layer (kernel ``k``, stride ``s``) over time-major activations is a matmul of its input
    windows ``[T', k*C_in]`` (each one contiguous span: a free view for ``k == s``, one copy otherwise)
    with the weight ``[C_out, k*C_in]``, packed once, with the bias and the activation fused as oneDNN
    post-ops where there is no norm in between. Layers after the first run in the compute dtype
    (bfloat16: inputs and weights bf16, fp32 accumulation); layer 0 (one input channel, ``k*C_in`` = 10:
    memory-bound) stays float32, as do the norms' statistics.

    Group norm (base checkpoints: layer 0 normalised per channel over the whole time axis): its
    statistics follow from the windows' mean ``mu`` and covariance ``S`` (float64), since the conv is
    linear: channel ``c``'s mean is ``w_c . mu + b_c`` and its variance ``w_c^T S w_c``. The norm is then a
    per-channel affine map folded into layer 0's weight and bias per batch row (no statistics pass over
    the 512-channel activations). Layer norm (large checkpoints): float32 LayerNorm over channels after
    each layer's matmul, then the activation.

    Output frames are computed ``tile_frames`` at a time from their slice of the waveform (the stack has
    no padding: :mod:`unispeech_fast.tiling`), one batch row at a time, so the activations of a tile stay
    in cache and none exists at full length. ``forward``: ``input_values`` float32 ``[B, L]`` ->
    features float32 ``[B, C, T]`` (a transposed view of a ``[B, T, C]`` tensor).
    """

    def __init__(self, module: FeatureEncoder, dtype: torch.dtype, tile_frames: int = 64) -> None:
        super().__init__()
        if not isinstance(tile_frames, int) or tile_frames < 1:
            raise ValueError(f"tile_frames must be a positive int, got {tile_frames!r}")
        layers = list(module.conv_layers)
        for i, layer in enumerate(layers):
            if type(layer.conv) is not nn.Conv1d or layer.conv.padding != (0,) or layer.conv.dilation != (1,) \
                    or layer.conv.groups != 1:
                raise TypeError(f"optimize_for_inference expects plain unpadded Conv1d layers in the feature "
                                f"encoder; conv_layers[{i}].conv is {layer.conv!r}")
        self.dtype = dtype
        self.tile_frames = tile_frames
        self.kernels = [layer.conv.kernel_size[0] for layer in layers]
        self.strides = [layer.conv.stride[0] for layer in layers]
        self.channels = layers[-1].conv.out_channels
        self.group_norm = module.norm_type == "group" and layers[0].layer_norm is not None
        self.eps = CONV_NORM_EPS
        fused = _fused_activation_name(module.activation)
        self.activation_name = module.activation
        self.activation = get_activation(module.activation)  # where not fused into the matmul
        with torch.no_grad():
            first = layers[0]
            self.weight0 = _conv_matrix(first.conv.weight.detach()).double().clone()  # [C0, k0]
            self.bias0 = None if first.conv.bias is None else first.conv.bias.detach().double().clone()
            if self.group_norm:
                self.gamma0 = first.layer_norm.weight.detach().double().clone()
                self.beta0 = first.layer_norm.bias.detach().double().clone()
            self.linears = nn.ModuleList()  # per layer, its packed matmul
            self.norms: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # per layer, LayerNorm (w, b) or None
            for i, layer in enumerate(layers):
                norm = None
                if layer.layer_norm is not None and not (i == 0 and self.group_norm):
                    norm = (layer.layer_norm.weight.detach().clone(), layer.layer_norm.bias.detach().clone())
                layer_dtype = torch.float32 if i == 0 else dtype
                self.linears.append(PackedLinear(_conv_matrix(layer.conv.weight), layer.conv.bias, layer_dtype,
                                                 fused if norm is None else None))
                self.norms.append(norm)

    def extra_repr(self) -> str:
        return (f"kernels={self.kernels}, strides={self.strides}, dtype={self.dtype}, "
                f"group_norm={self.group_norm}, tile_frames={self.tile_frames}")

    def _layer0_folded(self, x: torch.Tensor) -> list[PackedLinear]:
        """Per batch row, layer 0 with its group norm folded in: ``W_c gamma_c / std_c``, bias shifted."""
        mu, cov = _window_moments(x, self.kernels[0], self.strides[0])
        w = self.weight0
        mean = mu @ w.T + (0.0 if self.bias0 is None else self.bias0)  # [B, C0]
        var = torch.einsum("ck,bkl,cl->bc", w, cov, w).clamp_min(0.0)
        scale = self.gamma0 * torch.rsqrt(var + self.eps)  # [B, C0]
        shift = self.beta0 - mean * scale + (0.0 if self.bias0 is None else self.bias0 * scale)
        fused = self.linears[0].activation
        return [PackedLinear(w * scale[row, :, None], shift[row], torch.float32, fused) for row in range(x.shape[0])]

    def _tile(self, wave: torch.Tensor, first_layer: PackedLinear) -> torch.Tensor:
        """One row's waveform slice ``[L]`` -> its output frames ``[T, C]`` (compute dtype)."""
        h = wave[:, None]
        for i, (linear, norm, kernel, stride) in enumerate(zip(self.linears, self.norms, self.kernels, self.strides)):
            if i == 0:
                linear = first_layer
            h = linear(_window_matrix(h, kernel, stride))
            if norm is not None:
                h = F.layer_norm(h.float(), (h.shape[-1],), norm[0], norm[1], self.eps)
            if linear.activation is None:
                h = self.activation(h.float())
        return h  # the next layer's matmul casts its windows to its own dtype

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        if input_values.dim() != 2 or input_values.dtype != torch.float32:
            raise ValueError(f"input_values must be float32 [batch, samples], got {input_values.dtype} "
                             f"{tuple(input_values.shape)}")
        frames = tiling.output_frames(input_values.shape[-1], self.kernels, self.strides)
        if frames == 0:
            need = tiling.input_span(0, 1, self.kernels, self.strides)[1]
            raise ValueError(f"input_values has {input_values.shape[-1]} samples, fewer than the receptive "
                             f"field {need}")
        x = input_values.contiguous()
        firsts = self._layer0_folded(x) if self.group_norm else [self.linears[0]] * x.shape[0]
        out = x.new_empty(x.shape[0], frames, self.channels)
        for first in range(0, frames, self.tile_frames):
            last = min(first + self.tile_frames, frames)
            start, stop = tiling.input_span(first, last, self.kernels, self.strides)
            for row in range(x.shape[0]):
                out[row, first:last] = self._tile(x[row, start:stop], firsts[row])
        return out.transpose(1, 2)


class InferenceFeatureProjection(nn.Module):
    """LayerNorm (float32) then the packed projection. The snapshot builds it in float32 whatever the compute
    dtype (the projection is under 1% of the model's FLOPs, and in bfloat16 its rounding reaches every
    layer: on UniSpeechSat-base, 4 s of audio, the normwise error of ``last_hidden_state`` went from 5.5e-3
    to 4.8e-3 with it in float32); ``dtype`` is there to measure that (``benchmarks/cpu_engine_bf16_budget.py``).
    Returns ``(hidden [B, T, H], normed [B, T, C])``, both float32."""

    def __init__(self, module: FeatureProjection, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.layer_norm = copy.deepcopy(module.layer_norm)
        self.projection = PackedLinear(module.projection.weight, module.projection.bias, dtype)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.layer_norm(features)
        return self.projection(normed).float(), normed


class InferencePositionalConv(nn.Module):
    """The positional conv with its weight norm folded once: ``x + act(conv(x, W) + b)``, float32 ``[B, T, H]``.

    The folded weight is reordered once for oneDNN's grouped convolution
    (``torch.ops.mkldnn._convolution_pointwise``), which reads ``[B, T, H]`` as a channels-last
    ``[B, H, 1, T]`` view (no transpose copy) and fuses the bias and the activation (GELU, ReLU) as
    post-ops; other activations are applied after it. Against ``F.conv1d`` on the transposed input with a
    separate GELU (the previous snapshot) it took 0.6x the CPU time at the base shapes (768 channels, 16
    groups, kernel 128, 499 and 1499 frames, 1 thread; measured under load, CPU time).
    """

    def __init__(self, module: PositionalConvEmbedding, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype  # the snapshot uses float32; bfloat16 (input and weight) is there to measure it
        with torch.no_grad():
            weight = torch._weight_norm(module.weight_v, module.weight_g, 2).detach().to(dtype)
            self.kernel_size = weight.shape[-1]
            self.groups = module.groups
            self.padding = [0, self.kernel_size // 2]
            # Packed for any input size (input_size=None): batch and length vary per call.
            self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
                weight.unsqueeze(2).contiguous(), self.padding, [1, 1], [1, 1], self.groups, None)
            self.bias = None if module.conv.bias is None else module.conv.bias.detach().to(dtype).clone()
        fused = _fused_activation_name(module.activation)
        self._attr, self._algorithm = ("none", "") if fused is None else _FUSED_ACTIVATIONS[fused]
        self.activation = None if fused is not None else get_activation(module.activation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, groups={self.groups}, dtype={self.dtype}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.contiguous()
        frames = hidden_states.shape[1]
        # [B, H, 1, T] channels-last, memory [B, T, H]
        channels_last = hidden_states.to(self.dtype).transpose(1, 2).unsqueeze(2)
        h = torch.ops.mkldnn._convolution_pointwise(channels_last, self.packed_weight, self.bias, self.padding,
                                                    [1, 1], [1, 1], self.groups, self._attr, [], self._algorithm)
        h = h[:, :, 0, :frames].transpose(1, 2)  # an even kernel yields one extra frame: dropped
        if self.activation is not None:
            h = self.activation(h.float())
        return hidden_states + h.float()


# ------------------------------------------------------------------------------- what a snapshot cannot carry
# The snapshot rebuilds these modules from their weights; their deep-copied children (LayerNorms, the adapter)
# keep their type and hooks, so only the rest of each subtree is checked.
_REPLACED = (EncoderLayer, EncoderLayerStableLayerNorm, FeatureEncoder, FeatureProjection, PositionalConvEmbedding)
_CARRIED_CHILDREN = {EncoderLayer: ("layer_norm", "final_layer_norm"),
                     EncoderLayerStableLayerNorm: ("layer_norm", "final_layer_norm", "adapter_layer"),
                     FeatureProjection: ("layer_norm",)}
# The module types the rebuilt modules stand in for, exactly (a subclass may override forward).
_REBUILT_TYPES = (*_REPLACED, Attention, FeedForward, ConvLayer, nn.Linear, nn.Conv1d, nn.LayerNorm, nn.GroupNorm,
                  nn.Dropout, nn.ModuleList)


def _refuse_what_a_snapshot_would_drop(model: nn.Module) -> None:
    """Raise ``TypeError`` for anything on the modules the snapshot rebuilds from weights that a rebuild would
    silently lose: a forward/backward hook, a wrapped or subclassed layer (LoRA or other adapters, PEFT
    wrappers, parametrizations), or a feed-forward activation that no longer matches the config."""
    from .patching import _hooks, _is_weight_normed

    for path, module in model.named_modules():
        if not isinstance(module, _REPLACED):
            continue
        carried = {id(getattr(module, name)) for name in _CARRIED_CHILDREN.get(type(module), ())
                   if getattr(module, name, None) is not None}
        stack = [(path, module)]
        while stack:
            name, sub = stack.pop()
            if id(sub) in carried:
                continue
            where = f"{name} ({type(sub).__name__})"
            if _hooks(sub) or "forward" in vars(sub):  # a hook, or a forward replaced on the instance
                what = f"the hooks on {where}" if _hooks(sub) else f"the forward replaced on the instance {where}"
                raise TypeError(f"optimize_for_inference rebuilds {path} from its weights, so {what} would not run in "
                                f"the snapshot; remove them (or fold what they do into the weights) first")
            if isinstance(sub, PositionalConvEmbedding) and not _is_weight_normed(sub.conv):
                raise TypeError(f"optimize_for_inference folds the positional conv's weight norm; {name}.conv is not "
                                f"exactly weight_norm(dim=2) of a Conv1d")
            if type(sub) not in _REBUILT_TYPES:
                raise TypeError(f"optimize_for_inference rebuilds {path} from plain layers' weights; {where} is not one "
                                f"of them (merge adapters such as LoRA into the weights first)")
            if isinstance(sub, FeedForward) and sub.intermediate_act_fn is not get_activation(model.config.hidden_act):
                raise TypeError(f"{name}.intermediate_act_fn is not config.hidden_act ({model.config.hidden_act!r}), "
                                f"the activation the snapshot fuses; set the config to match")
            if isinstance(sub, PositionalConvEmbedding):
                continue  # its conv's parametrization internals were checked above
            stack.extend((f"{name}.{child}", m) for child, m in sub.named_children() if m is not None)


# ------------------------------------------------------------------------------------------ the snapshot
class _InferenceOnly:
    """Mixed into the snapshot's class: forbids training, moving, casting and reloading."""

    _optimized_dtype: torch.dtype

    @staticmethod
    def _refuse(what: str) -> InferenceOnlyError:
        return InferenceOnlyError(
            f"{what}: this model is an inference-only snapshot returned by unispeech_fast.optimize_for_inference "
            f"(prepacked weights, no autograd); do this on the original model, then call optimize_for_inference "
            f"again")

    @property
    def optimized_dtype(self) -> torch.dtype:
        """The compute dtype the snapshot was built for (inputs and outputs are float32)."""
        return self._optimized_dtype

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the dtype of input_values it takes

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def train(self, mode: bool = True):
        if mode:
            raise self._refuse("cannot train(): no training mode")
        return super().train(False)

    def parameters(self, recurse: bool = True):
        raise self._refuse("cannot train: parameters() is unavailable (no optimizer can update a snapshot)")

    def named_parameters(self, *args, **kwargs):
        raise self._refuse("cannot train: named_parameters() is unavailable")

    def requires_grad_(self, requires_grad: bool = True):
        raise self._refuse("cannot train: requires_grad_ is unavailable")

    def load_state_dict(self, *args, **kwargs):
        raise self._refuse("cannot load weights: load_state_dict is unavailable")

    def save_pretrained(self, *args, **kwargs):
        raise self._refuse("cannot save: save_pretrained is unavailable (save the original model)")

    def state_dict(self, *args, **kwargs):
        # The packed weights are plain attributes, so a state_dict would hold only the unpacked leftovers.
        raise self._refuse("cannot save: state_dict is unavailable (the packed weights are not in it; save the "
                           "original model)")

    def __reduce_ex__(self, protocol):  # pickle / torch.save: oneDNN's packed tensors have no storage to save
        raise self._refuse("cannot pickle or torch.save: the packed weights are not serialisable (save the original "
                           "model)")

    def __deepcopy__(self, memo):  # oneDNN's packed tensors cannot be copied
        raise self._refuse("cannot deepcopy: the packed weights cannot be copied (copy the original model)")

    def _apply(self, fn, recurse=True):
        raise self._refuse("cannot move or cast: .cuda/.half/.float/.double are unavailable")

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if (device is None or torch.device(device).type == "cpu") and dtype in (None, torch.float32):
            return self
        raise self._refuse("cannot move or cast: .to(another device or dtype) is unavailable")

    def cpu(self):
        return self  # already on the CPU

    def forward(self, *args: Any, **kwargs: Any):
        if torch.is_grad_enabled():
            for name, value in list(enumerate(args)) + list(kwargs.items()):
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    arg = f"argument {name}" if isinstance(name, int) else name
                    raise self._refuse(f"cannot differentiate: input {arg} requires grad")
        with torch.no_grad():
            return super().forward(*args, **kwargs)


_SNAPSHOT_CLASSES: dict[type, type] = {}


def _snapshot_class(cls: type) -> type:
    if cls not in _SNAPSHOT_CLASSES:
        _SNAPSHOT_CLASSES[cls] = type(f"Optimized{cls.__name__}", (_InferenceOnly, cls),
                                      {"__module__": __name__, "__doc__": cls.__doc__})
    return _SNAPSHOT_CLASSES[cls]


def optimize_for_inference(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An inference-only snapshot of ``model`` with weights prepacked for CPU.

    Args:
        model: one of the ten unispeech_fast model classes (``UniSpeech*`` / ``UniSpeechSat*``), with
            float32 parameters on the CPU. It is not modified.
        dtype: the compute precision: ``torch.float32`` or ``torch.bfloat16`` (the encoder's matmuls in
            bfloat16 with fp32 accumulation, attention's q/k/v too; LayerNorm, the residual stream, the positional
            conv, the feature encoder, the feature projection and the heads in float32).

    Returns:
        A deep copy in eval mode, of a subclass of ``type(model)``, that takes float32 ``input_values``
        and returns float32 outputs, with the same arguments and outputs as ``model``'s forward.

    The result is a **snapshot of the weights at call time**, like ``torch.jit.freeze``: later changes to
    ``model`` (in-place writes, ``load_state_dict``, optimizer steps) do not affect it; optimize again to
    pick them up. It is for inference only: ``.train()``, inputs that require grad, ``parameters()`` (so
    an optimizer), ``requires_grad_``, ``load_state_dict``, ``state_dict``, ``save_pretrained``, pickling,
    ``copy.deepcopy`` and moving or casting it raise :class:`InferenceOnlyError`; its outputs carry no
    autograd graph.

    Raises ``TypeError`` (naming the module) for what rebuilding the encoder layers, feature encoder,
    feature projection and positional conv from their weights would silently lose: hooks on or inside
    them (the encoder layers' deep-copied LayerNorms and adapter keep theirs), wrapped or subclassed layers
    (merge LoRA and other adapters into the weights first), a feed-forward activation that differs from
    ``config.hidden_act``.
    """
    from .models import MODEL_CLASSES  # (the models package imports this module's siblings)
    from .models.base import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        kind = type(model)
        if kind.__module__.split(".")[0] == "transformers" and kind.__name__ in {c.__name__ for c in MODEL_CLASSES}:
            raise TypeError(f"model must be a unispeech_fast model (one of the ten classes), got transformers' "
                            f"{kind.__name__}; load the checkpoint with unispeech_fast.{kind.__name__}.from_pretrained "
                            f"(same weights and outputs) and optimize that")
        raise TypeError(f"model must be a unispeech_fast model (one of the ten classes), got {kind.__name__}")
    if isinstance(model, _InferenceOnly):
        raise TypeError("model is already an optimize_for_inference snapshot; optimize the original model")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    params = list(model.parameters())
    bad = sorted({f"{p.device.type}/{p.dtype}" for p in params if p.device.type != "cpu" or p.dtype != torch.float32})
    if bad:
        raise ValueError(f"optimize_for_inference builds CPU kernels from float32 weights; model has parameters "
                         f"on/of {bad}: call it on model.float().cpu()")
    _refuse_what_a_snapshot_would_drop(model)
    if not _onednn_linear_available():
        raise RuntimeError("optimize_for_inference needs torch's oneDNN (mkldnn) linear and convolution ops "
                           "(torch.ops.mkldnn._linear_pointwise / _reorder_linear_weight / _convolution_pointwise / "
                           "_reorder_convolution_weight), which this torch build lacks")

    # The replaced modules are built straight from the original's weights (each packs or copies what it
    # keeps) and handed to deepcopy through its memo, so their dense weights are never deep-copied first:
    # the peak memory of the call is the original plus the snapshot.
    hidden_act = model.config.hidden_act
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (EncoderLayer, EncoderLayerStableLayerNorm)):
                memo[id(module)] = InferenceEncoderLayer(module, hidden_act, dtype)
            elif isinstance(module, FeatureEncoder):
                memo[id(module)] = InferenceFeatureEncoder(module, torch.float32, module.tile_frames or 64)
            elif isinstance(module, FeatureProjection):
                memo[id(module)] = InferenceFeatureProjection(module)
            elif isinstance(module, PositionalConvEmbedding):
                memo[id(module)] = InferencePositionalConv(module)
        frozen = copy.deepcopy(model, memo)
    frozen.eval()
    for p in nn.Module.parameters(frozen):
        p.requires_grad_(False)
    frozen.__class__ = _snapshot_class(type(model))
    frozen._optimized_dtype = dtype
    logger.info("optimize_for_inference: %s snapshot, compute dtype %s", type(model).__name__, dtype)
    return frozen
