"""Building blocks of the UniSpeech / UniSpeech-SAT networks.

Each module owns its parameters under transformers' names (so state dicts load unchanged) and runs
its fused op through :mod:`unispeech_fast.ops`, i.e. through dispatch, never a backend directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, ops, tiling
from .activations import get_activation
from .configuration import _BaseConfig
from .ops.attention import padding_checked_once

__all__ = [
    "ConvLayer",
    "FeatureEncoder",
    "FeatureProjection",
    "PositionalConvEmbedding",
    "Attention",
    "FeedForward",
    "AttnAdapterLayer",
    "EncoderLayer",
    "EncoderLayerStableLayerNorm",
    "Encoder",
    "GumbelVectorQuantizer",
    "TDNNLayer",
    "AMSoftmaxLoss",
]

# The conv-stack norms use torch's default eps whatever config.layer_norm_eps says (as in transformers).
CONV_NORM_EPS = 1e-5


def _plain_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` that nothing wraps or hooks (PEFT/LoRA replace or hook such layers:
    those are called as modules, never bypassed through their weights)."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not module._backward_hooks and not module._backward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
            and not nn.modules.module._global_backward_hooks and not nn.modules.module._global_backward_pre_hooks)


def _dispatch_dense() -> bool:
    # The dense layers go through dispatch under auto and cpp only: the eager, triton and cuda backends
    # are about the fused ops, and F.linear (cuBLAS on a GPU) is what their dense layers run.
    return dispatch.current_backend() in ("auto", "cpp")


def dense(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain ``nn.Linear`` under ``backend("auto"|"cpp")`` goes through the dispatched
    :func:`unispeech_fast.ops.linear` (oneDNN on CPU for inference, else ``F.linear``)."""
    if _plain_linear(module) and _dispatch_dense():
        return ops.linear(x, module.weight, module.bias)
    return module(x)


class ConvLayer(nn.Module):
    """Holds one conv layer's parameters: ``conv`` and, where the config has one, ``layer_norm``."""

    #: Children whose parameters the forward reads directly instead of calling them as modules (so a
    #: hook on them, or a wrapper in their place, would be bypassed); :func:`unispeech_fast.patch` uses it.
    READS_WEIGHTS_OF = ("conv", "layer_norm")

    def __init__(self, config: _BaseConfig, layer_id: int, norm: str | None) -> None:
        super().__init__()
        in_dim = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        out_dim = config.conv_dim[layer_id]
        self.conv = nn.Conv1d(
            in_dim,
            out_dim,
            kernel_size=config.conv_kernel[layer_id],
            stride=config.conv_stride[layer_id],
            bias=config.conv_bias,
        )
        if norm == "group":
            self.layer_norm: nn.Module | None = nn.GroupNorm(out_dim, out_dim, eps=CONV_NORM_EPS, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(out_dim, eps=CONV_NORM_EPS, elementwise_affine=True)
        else:
            self.layer_norm = None


#: Per device type, (layer-0 activation bytes above which inference is tiled, output frames per tile).
#: CPU: tiles of 64 frames keep each layer's activations in cache (benchmarks/results/cpu_forward_*.json:
#: the base feature encoder as the model runs it, 10 s of audio, against transformers'); at 1-2 s of audio
#: tiling did not pay in trial runs (it adds a statistics pass for group norm), hence the 12 MiB (~2 s)
#: threshold.
#: Elsewhere (GPU) tiling is for memory only: 256 MiB (~40 s per batch row), 256-frame tiles.
TILING_DEFAULTS: dict[str, tuple[int, int]] = {"cpu": (12 * 2**20, 64), "other": (256 * 2**20, 256)}


class FeatureEncoder(nn.Module):
    """The strided conv stack: waveform ``[B, L]`` to features ``[B, C, T]``."""

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        self.norm_type = config.feat_extract_norm
        if self.norm_type == "group":
            norms = ["group"] + [None] * (config.num_feat_extract_layers - 1)
        else:
            norms = ["layer"] * config.num_feat_extract_layers
        self.conv_layers = nn.ModuleList(ConvLayer(config, i, n) for i, n in enumerate(norms))
        self.activation = config.feat_extract_activation
        self.gradient_checkpointing = False
        self._requires_grad = True
        # Without autograd, inputs whose untiled layer-0 activation would exceed tile_threshold_bytes go
        # through the exact tiled extractor (unispeech_fast.tiling), tile_frames output frames per tile.
        # None takes the input's device default (TILING_DEFAULTS): small cache-sized tiles on CPU, for
        # speed, and large ones elsewhere, where tiling is for memory (long audio).
        self.tile_threshold_bytes: int | None = None
        self.tile_frames: int | None = None

    def _freeze_parameters(self) -> None:
        for param in self.parameters():
            param.requires_grad = False
        self._requires_grad = False

    def _tile_frames_for(self, input_values: torch.Tensor) -> int | None:
        """Output frames per tile if this input is to be tiled, else None."""
        if torch.is_grad_enabled() and (input_values.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None  # training keeps the untiled path (gradient checkpointing is its memory saver)
        if torch.compiler.is_compiling():
            return None  # a traced tile loop would unroll into one graph node per tile
        threshold, frames = TILING_DEFAULTS.get(input_values.device.type, TILING_DEFAULTS["other"])
        threshold = threshold if self.tile_threshold_bytes is None else self.tile_threshold_bytes
        frames = frames if self.tile_frames is None else self.tile_frames
        first = self.conv_layers[0].conv
        frames0 = (input_values.shape[-1] - first.kernel_size[0]) // first.stride[0] + 1
        nbytes = input_values.shape[0] * first.out_channels * max(frames0, 0) * input_values.element_size()
        return frames if nbytes > threshold else None

    def _run(self, input_values: torch.Tensor) -> torch.Tensor:
        layers = list(self.conv_layers)
        run = ops.feature_extractor
        extra = {}
        tile_frames = self._tile_frames_for(input_values)
        if tile_frames is not None:
            run, extra = tiling.tiled_feature_extractor, {"tile_frames": tile_frames}
        return run(
            input_values,
            conv_weights=[layer.conv.weight for layer in layers],
            conv_biases=[layer.conv.bias for layer in layers],
            norm_weights=[None if layer.layer_norm is None else layer.layer_norm.weight for layer in layers],
            norm_biases=[None if layer.layer_norm is None else layer.layer_norm.bias for layer in layers],
            conv_strides=[layer.conv.stride[0] for layer in layers],
            norm_type=self.norm_type,
            activation=self.activation,
            eps=CONV_NORM_EPS,
            **extra,
        )

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and self._requires_grad:
            return torch.utils.checkpoint.checkpoint(self._run, input_values, use_reentrant=False)
        return self._run(input_values)


class FeatureProjection(nn.Module):
    """LayerNorm over conv channels, then Linear to hidden size, then dropout.

    Returns ``(hidden [B, T, H], normed_features [B, T, C])``; the latter is ``extract_features``.
    """

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.layer_norm(features)
        return self.dropout(dense(self.projection, normed)), normed


class PositionalConvEmbedding(nn.Module):
    """Weight-normed grouped conv (kernel K, padding K//2, last frame dropped for even K), activation,
    added to its input. Parameters live at ``conv.parametrizations.weight.original0`` (g, ``[1, 1, K]``),
    ``conv.parametrizations.weight.original1`` (v, ``[H, H/groups, K]``) and ``conv.bias``."""

    READS_WEIGHTS_OF = ("conv",)  # see ConvLayer.READS_WEIGHTS_OF

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        conv = nn.Conv1d(
            config.hidden_size,
            config.hidden_size,
            kernel_size=config.num_conv_pos_embeddings,
            padding=config.num_conv_pos_embeddings // 2,
            groups=config.num_conv_pos_embedding_groups,
        )
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.groups = config.num_conv_pos_embedding_groups
        self.activation = config.feat_extract_activation

    @property
    def weight_g(self) -> torch.Tensor:
        return self.conv.parametrizations.weight.original0

    @property
    def weight_v(self) -> torch.Tensor:
        return self.conv.parametrizations.weight.original1

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` to ``hidden_states + pos(hidden_states)``."""
        return ops.pos_conv(hidden_states, self.weight_g, self.weight_v, self.conv.bias, self.groups, self.activation)


class Attention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections and no positional bias."""

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout = config.attention_dropout
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, frames, _ = hidden_states.shape
        # Three projections, each read from its module on every call: no concatenated copy of the
        # weights exists that could go stale (a fused q/k/v weight is a snapshot, which belongs to
        # unispeech_fast.optimize_for_inference). At the base model's shapes on CPU one cat + GEMM
        # measured 3-7% slower than three GEMMs, with bit-identical outputs. Wrapped or hooked
        # projections (e.g. LoRA) run as the modules they are (see dense()).
        q, k, v = (dense(m, hidden_states).view(batch, frames, self.num_heads, self.head_dim)
                   for m in (self.q_proj, self.k_proj, self.v_proj))
        out, weights = ops.attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            head_mask=head_mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scaling,
            need_weights=output_attentions,
        )
        return dense(self.out_proj, out.reshape(batch, frames, self.embed_dim)), weights


class FeedForward(nn.Module):
    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = get_activation(config.hidden_act)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.intermediate_dropout(self.intermediate_act_fn(dense(self.intermediate_dense, hidden_states)))
        return self.output_dropout(dense(self.output_dense, hidden_states))


class AttnAdapterLayer(nn.Module):
    """LayerNorm -> Linear(H, adapter_attn_dim) -> ReLU -> Linear(adapter_attn_dim, H)."""

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.linear_1 = nn.Linear(config.hidden_size, config.adapter_attn_dim)
        self.act_fn = nn.ReLU()
        self.linear_2 = nn.Linear(config.adapter_attn_dim, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_fn(self.linear_1(self.norm(hidden_states))))


class EncoderLayer(nn.Module):
    """Post-LN layer: ``x = LN(x + drop(attn(x))); x = final_LN(x + ffn(x))``."""

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, key_padding_mask=None, head_mask=None, output_attentions=False):
        residual = hidden_states
        hidden_states, weights = self.attention(hidden_states, key_padding_mask, head_mask, output_attentions)
        hidden_states = self.layer_norm(residual + self.dropout(hidden_states))
        hidden_states = hidden_states + self.feed_forward(hidden_states)
        return self.final_layer_norm(hidden_states), weights


class EncoderLayerStableLayerNorm(nn.Module):
    """Pre-LN layer: ``x = x + drop(attn(LN(x))); x = x + ffn(final_LN(x)); [x = x + adapter(x)]``."""

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if getattr(config, "adapter_attn_dim", None) is not None:
            self.adapter_layer: nn.Module | None = AttnAdapterLayer(config)
        else:
            self.adapter_layer = None

    def forward(self, hidden_states, key_padding_mask=None, head_mask=None, output_attentions=False):
        residual = hidden_states
        attn, weights = self.attention(self.layer_norm(hidden_states), key_padding_mask, head_mask, output_attentions)
        hidden_states = residual + self.dropout(attn)
        hidden_states = hidden_states + self.feed_forward(self.final_layer_norm(hidden_states))
        if self.adapter_layer is not None:
            hidden_states = hidden_states + self.adapter_layer(hidden_states)
        return hidden_states, weights


class Encoder(nn.Module):
    """Positional conv and the transformer layers, post-LN or pre-LN ("stable") per the config."""

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        self.config = config
        self.stable = bool(config.do_stable_layer_norm)
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        layer_cls = EncoderLayerStableLayerNorm if self.stable else EncoderLayer
        self.layers = nn.ModuleList(layer_cls(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        # None: LayerDrop draws from the global torch RNG (transformers' stream). A generator (set by
        # PreTrainedModel.seed_layerdrop) gives draws that do not depend on batch size or dropout.
        self.layerdrop_generator: torch.Generator | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Returns ``(last_hidden_state, hidden_states or None, attentions or None)``.

        ``frame_mask`` is bool ``[B, T]`` (True = valid frame); padded frames are zeroed before the
        positional conv and masked as keys. ``head_mask`` is ``[num_layers, num_heads]`` or None.
        """
        key_padding_mask = None
        if frame_mask is not None:
            hidden_states = hidden_states.masked_fill(~frame_mask[..., None], 0.0)
            if torch.compiler.is_compiling() or not bool(frame_mask.all()):  # no data-dependent branch in a graph
                key_padding_mask = frame_mask
        hidden_states = self.pos_conv_embed(hidden_states)
        if not self.stable:
            hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)

        all_hidden: list[torch.Tensor] = []
        all_attn: list[torch.Tensor] = []
        layerdrop = self.config.layerdrop
        # The kernels' padding checks and lengths of key_padding_mask: once per forward, not per layer.
        with padding_checked_once(key_padding_mask):
            for i, layer in enumerate(self.layers):
                if output_hidden_states:
                    all_hidden.append(hidden_states)
                # LayerDrop draws torch.rand([]) per layer exactly as transformers does (same RNG stream),
                # unless seed_layerdrop gave the encoder its own generator.
                drop = self.training and layerdrop > 0.0
                if drop and bool(torch.rand([], generator=self.layerdrop_generator) < layerdrop):
                    continue  # a skipped layer records its unchanged input as its output (transformers 4.x)
                layer_head_mask = None if head_mask is None else head_mask[i]
                if self.gradient_checkpointing and self.training:
                    hidden_states, weights = torch.utils.checkpoint.checkpoint(
                        layer, hidden_states, key_padding_mask, layer_head_mask, output_attentions,
                        use_reentrant=False,
                    )
                else:
                    hidden_states, weights = layer(hidden_states, key_padding_mask, layer_head_mask, output_attentions)
                if output_attentions:
                    all_attn.append(weights)
        last = self.layer_norm(hidden_states) if self.stable else hidden_states
        if output_hidden_states:
            tie = bool(getattr(self.config, "tie_last_hidden_states", False))
            all_hidden.append(last if tie else hidden_states)
        return (
            last,
            tuple(all_hidden) if output_hidden_states else None,
            tuple(all_attn) if output_attentions else None,
        )


class GumbelVectorQuantizer(nn.Module):
    """Product quantizer: ``weight_proj`` (in_dim -> G*V logits) and ``codevectors [1, G*V, D/G]``.

    ``temperature`` is a plain attribute (not saved), 2 initially; set it with the pretraining
    head's ``set_gumbel_temperature``.
    """

    def __init__(self, config: _BaseConfig, in_dim: int) -> None:
        super().__init__()
        self.num_groups = config.num_codevector_groups
        self.num_vars = config.num_codevectors_per_group
        self.codevectors = nn.Parameter(
            torch.empty(1, self.num_groups * self.num_vars, config.codevector_dim // self.num_groups)
        )
        self.weight_proj = nn.Linear(in_dim, self.num_groups * self.num_vars)
        self.temperature: float = 2

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                return_indices: bool = False) -> tuple[torch.Tensor, ...]:
        """``(quantized [B, T, D], perplexity)`` (+ codes ``[B, T, G]`` with ``return_indices``); ``mask``
        (bool ``[B, T]``) restricts the perplexity to those frames."""
        logits = self.weight_proj(hidden_states)
        return ops.gumbel_quantizer(logits, self.codevectors, self.num_groups, self.temperature, self.training,
                                    mask=mask, return_indices=return_indices)


class TDNNLayer(nn.Module):
    """X-vector TDNN layer: dilated conv over frames (weights stored as a Linear ``kernel``), then ReLU."""

    READS_WEIGHTS_OF = ("kernel",)  # see ConvLayer.READS_WEIGHTS_OF

    def __init__(self, config: _BaseConfig, layer_id: int) -> None:
        super().__init__()
        self.in_conv_dim = config.tdnn_dim[layer_id - 1] if layer_id > 0 else config.tdnn_dim[layer_id]
        self.out_conv_dim = config.tdnn_dim[layer_id]
        self.kernel_size = config.tdnn_kernel[layer_id]
        self.dilation = config.tdnn_dilation[layer_id]
        self.kernel = nn.Linear(self.in_conv_dim * self.kernel_size, self.out_conv_dim)
        self.activation = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.kernel.weight.view(self.out_conv_dim, self.kernel_size, self.in_conv_dim).transpose(1, 2)
        out = F.conv1d(hidden_states.transpose(1, 2), weight, self.kernel.bias, dilation=self.dilation)
        return self.activation(out.transpose(1, 2))


class AMSoftmaxLoss(nn.Module):
    """Additive-margin softmax loss (scale 30, margin 0.4) with a ``weight [input_dim, num_labels]``."""

    def __init__(self, input_dim: int, num_labels: int, scale: float = 30.0, margin: float = 0.4) -> None:
        super().__init__()
        self.scale = scale
        self.margin = margin
        self.num_labels = num_labels
        self.weight = nn.Parameter(torch.randn(input_dim, num_labels))
        self.loss = nn.CrossEntropyLoss()

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.flatten()
        weight = F.normalize(self.weight, dim=0)
        cos_theta = torch.mm(F.normalize(hidden_states, dim=1), weight)
        psi = cos_theta - self.margin
        onehot = F.one_hot(labels, self.num_labels)
        logits = self.scale * torch.where(onehot.bool(), psi, cos_theta)
        return self.loss(logits, labels)


@torch.no_grad()
def init_weights(module: nn.Module, config: _BaseConfig) -> None:
    """transformers' ``_init_weights`` for one module (applied children first, as ``post_init`` does)."""
    std = config.initializer_range
    if isinstance(module, GumbelVectorQuantizer):
        nn.init.normal_(module.weight_proj.weight, mean=0.0, std=1)
        nn.init.zeros_(module.weight_proj.bias)
        nn.init.uniform_(module.codevectors)
    elif isinstance(module, PositionalConvEmbedding):
        # transformers calls normal_ on the *computed* weight-norm weight, which changes nothing, so
        # g and v effectively keep torch's default Conv1d init; only the bias is really zeroed.
        nn.init.constant_(module.conv.bias, 0)
    elif isinstance(module, FeatureProjection):
        k = math.sqrt(1 / module.projection.in_features)
        nn.init.uniform_(module.projection.weight, a=-k, b=k)
        nn.init.uniform_(module.projection.bias, a=-k, b=k)
    elif isinstance(module, nn.Conv1d) and not nn.utils.parametrize.is_parametrized(module):
        nn.init.kaiming_normal_(module.weight)
        if module.bias is not None:
            k = math.sqrt(module.groups / (module.in_channels * module.kernel_size[0]))
            nn.init.uniform_(module.bias, a=-k, b=k)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, AMSoftmaxLoss):
        nn.init.normal_(module.weight)
