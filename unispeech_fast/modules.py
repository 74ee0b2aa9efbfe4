"""The backbone's layers: conv feature encoder, feature projection, positional conv, encoder layers
(and the Gumbel quantizer the pretraining heads put on top of them).

Each module owns its parameters under transformers' names (so state dicts load unchanged) and runs
its fused op through :mod:`unispeech_fast.ops`, i.e. through dispatch, never a backend directly; the
encoder's dense layers run through :func:`unispeech_fast._dense.dense` (the dense-layer policy). Each
``forward`` documents its shapes. Modules only a head uses (TDNN layer, AM-softmax loss) are in
:mod:`unispeech_fast.models.heads`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import ops, tiling
from ._dense import dense
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
]

# The conv-stack norms use torch's default eps whatever config.layer_norm_eps says (as in transformers).
CONV_NORM_EPS = 1e-5


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
        """
        Args:
            input_values (Tensor): waveforms, shape ``[batch, samples]``.
        Returns:
            Tensor: features, shape ``[batch, conv_dim[-1], frames]``, ``frames`` from
            ``config.output_length(samples)``.
        """
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
        """
        Args:
            features (Tensor): conv features, shape ``[batch, frames, conv_dim[-1]]``.
        Returns:
            Tensor: projected, shape ``[batch, frames, hidden_size]``.
            Tensor: the layer-normed features (``extract_features``), shape ``[batch, frames, conv_dim[-1]]``.
        """
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
        """
        Args:
            hidden_states (Tensor): shape ``[batch, frames, hidden_size]``.
        Returns:
            Tensor: ``hidden_states + pos(hidden_states)``, shape ``[batch, frames, hidden_size]``.
        """
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
        """
        Args:
            hidden_states (Tensor): shape ``[batch, frames, hidden_size]``.
            key_padding_mask (Tensor or None): bool, shape ``[batch, frames]`` (True = valid key).
            head_mask (Tensor or None): shape ``[num_heads]``.
            output_attentions (bool): also return the attention probabilities.
        Returns:
            Tensor: shape ``[batch, frames, hidden_size]``.
            Tensor or None: attention probabilities, shape ``[batch, num_heads, frames, frames]``.
        """
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
        """
        Args:
            hidden_states (Tensor): shape ``[batch, frames, hidden_size]``.
        Returns:
            Tensor: shape ``[batch, frames, hidden_size]`` (through ``[batch, frames, intermediate_size]``).
        """
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
        """
        Args:
            hidden_states (Tensor): shape ``[batch, frames, hidden_size]``.
        Returns:
            Tensor: shape ``[batch, frames, hidden_size]`` (through ``[batch, frames, adapter_attn_dim]``).
        """
        return self.linear_2(self.act_fn(self.linear_1(self.norm(hidden_states))))


class _EncoderLayerBase(nn.Module):
    """The submodules both encoder layers own, under transformers' names; each layer orders them in ``forward``."""

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class EncoderLayer(_EncoderLayerBase):
    """Post-LN layer: ``x = LN(x + drop(attn(x))); x = final_LN(x + ffn(x))``."""

    def forward(self, hidden_states, key_padding_mask=None, head_mask=None, output_attentions=False):
        """Arguments, results and shapes as :meth:`Attention.forward`: ``[batch, frames, hidden_size]`` in and out."""
        residual = hidden_states
        hidden_states, weights = self.attention(hidden_states, key_padding_mask, head_mask, output_attentions)
        hidden_states = self.layer_norm(residual + self.dropout(hidden_states))
        hidden_states = hidden_states + self.feed_forward(hidden_states)
        return self.final_layer_norm(hidden_states), weights


class EncoderLayerStableLayerNorm(_EncoderLayerBase):
    """Pre-LN layer: ``x = x + drop(attn(LN(x))); x = x + ffn(final_LN(x)); [x = x + adapter(x)]``."""

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__(config)
        if getattr(config, "adapter_attn_dim", None) is not None:
            self.adapter_layer: nn.Module | None = AttnAdapterLayer(config)
        else:
            self.adapter_layer = None

    def forward(self, hidden_states, key_padding_mask=None, head_mask=None, output_attentions=False):
        """Arguments, results and shapes as :meth:`EncoderLayer.forward`."""
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
        """
        Args:
            hidden_states (Tensor): projected features, shape ``[batch, frames, hidden_size]``.
            frame_mask (Tensor or None): bool, shape ``[batch, frames]`` (True = valid frame); padded
                frames are zeroed before the positional conv and masked as keys.
            head_mask (Tensor or None): shape ``[num_layers, num_heads]``.
        Returns:
            Tensor: ``last_hidden_state``, shape ``[batch, frames, hidden_size]``.
            tuple of Tensor or None: with ``output_hidden_states``, ``num_layers + 1`` tensors of that shape.
            tuple of Tensor or None: with ``output_attentions``, per layer ``[batch, num_heads, frames, frames]``.
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

    @property
    def gumbel_width(self) -> int:
        """The last dimension of the Gumbel noise: one value per codevector logit, ``G * V``."""
        return self.num_groups * self.num_vars

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                return_indices: bool = False, gumbels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """
        Args:
            hidden_states (Tensor): shape ``[batch, frames, in_dim]``.
            mask (Tensor or None): bool, shape ``[batch, frames]``; restricts the perplexity to those frames.
            gumbels (Tensor or None): in training, the Gumbel noise ``[batch, frames, G*V]`` to use instead
                of a draw from torch's global generator (the seeding rule, README "Training").
        Returns:
            Tensor: quantized, shape ``[batch, frames, codevector_dim]``.
            Tensor: perplexity, a scalar.
            Tensor: with ``return_indices``, the codes, shape ``[batch, frames, num_groups]``.
        """
        logits = self.weight_proj(hidden_states)
        if gumbels is not None and not self.training:
            raise ValueError("gumbels (explicit Gumbel noise) is only used in training: the quantizer is in eval mode")
        extra = {} if gumbels is None else {"gumbels": gumbels}
        return ops.gumbel_quantizer(logits, self.codevectors, self.num_groups, self.temperature, self.training,
                                    mask=mask, return_indices=return_indices, **extra)


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
    elif hasattr(module, "init_weights_like_transformers"):  # head-only modules (models/heads.py) own theirs
        module.init_weights_like_transformers()


def __getattr__(name: str):
    # TDNNLayer and AMSoftmaxLoss moved to unispeech_fast.models.heads (only the x-vector head uses them);
    # old imports, and pickles of whole models that name them here, still find them.
    if name in ("TDNNLayer", "AMSoftmaxLoss"):
        from .models import heads

        return getattr(heads, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
