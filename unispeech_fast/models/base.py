"""Shared model machinery: input checks, the backbone, loading/saving hooks, freezing, checkpointing.

The backbone (:class:`Backbone`) is UniSpeechModel / UniSpeechSatModel; heads hold it under
``base_model_prefix`` ("unispeech" / "unispeech_sat") exactly like transformers, so state-dict keys
match.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configuration import _BaseConfig
from ..masking import compute_mask_indices
from ..modules import Encoder, FeatureEncoder, FeatureProjection, init_weights
from ..ops.feature_extractor.common import conv_output_length
from ..outputs import BaseModelOutput

__all__ = ["PreTrainedModel", "Backbone", "weighted_layer_sum"]


class PreTrainedModel(nn.Module):
    """Base of every model class: config handling, weights init, ``from_pretrained``/``save_pretrained``."""

    config_class: ClassVar[type[_BaseConfig]]
    base_model_prefix: ClassVar[str]
    main_input_name: ClassVar[str] = "input_values"
    # What transformers' Trainer, Accelerate and PEFT read from a model (see README "Training").
    supports_gradient_checkpointing: ClassVar[bool] = True
    _keys_to_ignore_on_save: ClassVar[list[str] | None] = None
    _keys_to_ignore_on_load_missing: ClassVar[list[str] | None] = None
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str] | None] = None
    _no_split_modules: ClassVar[list[str]] = ["EncoderLayer", "EncoderLayerStableLayerNorm"]
    is_parallelizable: ClassVar[bool] = False
    # The loss is a mean over the batch; it takes no ``num_items_in_batch``, so Trainer divides it by
    # the gradient-accumulation steps itself.
    accepts_loss_kwargs: ClassVar[bool] = False
    # Parameters that transformers initialises fresh when absent from a checkpoint of the same family
    # (the backbone's ``masked_spec_embed`` depends on the masking config for UniSpeech).
    _optional_backbone_keys: ClassVar[tuple[str, ...]] = ("masked_spec_embed",)

    def __init__(self, config: _BaseConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"config must be a {self.config_class.__name__}, got {type(config).__name__}"
            )
        config.validate()
        self.config = config

    # -------------------------------------------------------------------------------- init
    def post_init(self) -> None:
        """Initialise every parameter as transformers' ``post_init`` does."""
        self.apply(lambda m: init_weights(m, self.config))
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, Backbone) and hasattr(module, "masked_spec_embed"):
                    module.masked_spec_embed.uniform_()

    # -------------------------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def base_model(self) -> "Backbone":
        return getattr(self, self.base_model_prefix, self)  # type: ignore[return-value]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` if ``only_trainable``).

        ``exclude_embeddings`` is accepted for transformers' signature (Trainer passes it); these models
        have no token embeddings (no ``nn.Embedding``), so it changes nothing.
        """
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    @classmethod
    def can_generate(cls) -> bool:
        """Encoders only: nothing here generates (Trainer and pipelines ask)."""
        return False

    def floating_point_ops(self, inputs: dict[str, Any], exclude_embeddings: bool = True) -> int:
        """Estimated FLOPs of one forward + backward on ``inputs`` (a batch dict with ``input_values``).

        6 x (multiply-accumulates of the conv feature encoder) + 6 x frames x (parameters outside the
        feature encoder), frames counted on the padded batch; attention's T^2 term is left out, as
        transformers' own 6 x tokens x parameters estimate does. ``exclude_embeddings`` is accepted for
        transformers' signature and changes nothing (no embeddings).
        """
        values = inputs.get(self.main_input_name) if isinstance(inputs, dict) else None
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise ValueError(
                f"inputs must be a dict holding {self.main_input_name!r} of shape [batch, samples], got "
                f"{type(values).__name__ if not isinstance(values, torch.Tensor) else tuple(values.shape)}"
            )
        batch, length = values.shape
        conv_macs = 0
        in_channels = 1
        for out_channels, kernel, stride in zip(self.config.conv_dim, self.config.conv_kernel, self.config.conv_stride):
            length = conv_output_length(length, kernel, stride)
            conv_macs += in_channels * out_channels * kernel * max(length, 0)
            in_channels = out_channels
        frames = max(length, 0)
        encoder_params = self.num_parameters() - sum(
            p.numel() for p in self.base_model.feature_extractor.parameters()
        )
        return int(6 * batch * (conv_macs + frames * encoder_params))

    # -------------------------------------------------------------------------------- lengths and masks
    def _get_feat_extract_output_lengths(self, input_lengths: torch.Tensor | int) -> torch.Tensor | int:
        for kernel, stride in zip(self.config.conv_kernel, self.config.conv_stride):
            input_lengths = conv_output_length(input_lengths, kernel, stride)  # ints or int64 tensors (floor)
        return input_lengths

    def _get_feature_vector_attention_mask(self, num_frames: int, attention_mask: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, num_frames]``: True for frames below each sample's output length."""
        lengths = self._get_feat_extract_output_lengths(attention_mask.long().sum(-1)).to(torch.long)
        return torch.arange(num_frames, device=attention_mask.device)[None, :] < lengths[:, None]

    # -------------------------------------------------------------------------------- training helpers
    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int | None = None,
        offload: bool = False,
    ) -> None:
        """Recompute each encoder layer (and the conv feature encoder) in backward instead of storing
        its activations; only in training. Non-reentrant ``torch.utils.checkpoint`` is the one mode
        (it composes with DDP and with frozen inputs), so ``gradient_checkpointing_kwargs`` may only
        hold ``use_reentrant=False``; ``every_n_layers`` may only be 1 (or None) and ``offload`` False.
        The signature is transformers' (Trainer calls it with these arguments)."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False) is not False or kwargs:
            raise ValueError(
                "gradient_checkpointing_kwargs supports only {'use_reentrant': False} (non-reentrant "
                f"checkpointing is the one mode implemented), got {gradient_checkpointing_kwargs!r}"
            )
        if every_n_layers not in (None, 1) or isinstance(every_n_layers, bool):
            raise ValueError(f"every_n_layers must be 1 or None (every layer is checkpointed), got {every_n_layers!r}")
        if offload is not False:
            raise ValueError(f"offload must be False (activation offloading is not implemented), got {offload!r}")
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int | None = None,
        offload: bool = False,
    ) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable` (Trainer's
        ``gradient_checkpointing=True`` / ``activation_checkpointing=True`` calls this one)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.is_gradient_checkpointing

    def seed_layerdrop(self, seed: int | None) -> None:
        """Draw LayerDrop decisions from a generator of their own, seeded with ``seed``.

        By default LayerDrop draws ``torch.rand([])`` per layer from the global torch RNG, exactly as
        transformers does; under DDP that stream moves with each rank's dropout draws (whose count
        depends on the local batch), so ranks would drop different layers. With the same ``seed`` on
        every rank, every forward draws the same ``num_hidden_layers`` numbers on every rank and in a
        one-process run, whatever the batch. ``None`` goes back to the global RNG. The generator's
        state is not part of ``state_dict`` (keys stay transformers').
        """
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        for module in self.modules():
            if hasattr(module, "layerdrop_generator"):
                module.layerdrop_generator = None if seed is None else torch.Generator().manual_seed(seed)

    def freeze_feature_encoder(self) -> None:
        """Stop gradients to (and updates of) the conv feature encoder."""
        self.base_model.feature_extractor._freeze_parameters()

    def freeze_base_model(self) -> None:
        """Stop gradients to the whole backbone; only the head trains."""
        for param in self.base_model.parameters():
            param.requires_grad = False

    # -------------------------------------------------------------------------------- I/O
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        *,
        strict: bool = True,
        output_loading_info: bool = False,
        **config_overrides: Any,
    ):
        """Load a transformers-format checkpoint (local directory or hub id).

        Args:
            path_or_id: directory with ``config.json`` and ``model.safetensors`` (or sharded
                safetensors with an index, or ``pytorch_model.bin``), or a hub id resolved through
                ``huggingface_hub`` when installed and online.
            dtype: parameter dtype; None or ``"auto"`` keeps the checkpoint's (``config.dtype`` or
                the stored tensors' dtype), as transformers 5 does.
            device: where to put the model (default CPU).
            strict: raise on missing/unexpected backbone keys (head keys that transformers would
                initialise fresh or drop are always reported, never an error).
            output_loading_info: also return a dict with ``missing_keys``, ``unexpected_keys``,
                ``newly_initialized_keys`` and ``ignored_keys``.
            **config_overrides: config fields to change, e.g. ``num_labels=5`` or ``layerdrop=0.0``.
        """
        from ..loading import load_pretrained

        return load_pretrained(cls, path_or_id, dtype, device, strict, output_loading_info, config_overrides)

    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int | str | None = None,
                        safe_serialization: bool = True) -> None:
        """Write ``config.json`` and the weights in transformers' format (loadable by transformers)."""
        from ..loading import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size, safe_serialization=safe_serialization)

    def _resolve_output_flags(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        cfg = self.config
        oa = bool(getattr(cfg, "output_attentions", False)) if output_attentions is None else output_attentions
        oh = bool(getattr(cfg, "output_hidden_states", False)) if output_hidden_states is None else output_hidden_states
        rd = bool(getattr(cfg, "return_dict", True)) if return_dict is None else return_dict
        for name, value in (("output_attentions", oa), ("output_hidden_states", oh), ("return_dict", rd)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool or None, got {value!r}")
        return oa, oh, rd


# ------------------------------------------------------------------------------------------ input checks
def check_input_values(model: PreTrainedModel, input_values: Any) -> None:
    if not isinstance(input_values, torch.Tensor):
        raise TypeError(f"input_values must be a torch.Tensor of shape [batch, samples], got {type(input_values).__name__}")
    if input_values.dim() != 2:
        raise ValueError(
            f"input_values must have shape [batch, samples] (rank 2), got rank {input_values.dim()} "
            f"with shape {tuple(input_values.shape)}"
            + ("; add a batch dimension with input_values[None]" if input_values.dim() == 1 else "")
        )
    if input_values.is_complex() or not input_values.is_floating_point():
        raise TypeError(
            f"input_values must be a real floating-point tensor (the waveform), got dtype {input_values.dtype}"
        )
    param_dtype = model.dtype
    if input_values.dtype != param_dtype:
        raise TypeError(
            f"input_values has dtype {input_values.dtype} but the model's parameters are {param_dtype}; "
            f"cast the input with input_values.to({param_dtype})"
        )
    minimum = model.config.receptive_field()
    if input_values.shape[1] < minimum:
        raise ValueError(
            f"input_values has {input_values.shape[1]} samples per row, shorter than the model's receptive field: "
            f"at least {minimum} samples are needed for one output frame"
        )


def check_attention_mask(model: PreTrainedModel, attention_mask: Any, input_values: torch.Tensor) -> None:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_values.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_values {tuple(input_values.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool or integer (1 = sample, 0 = padding), got {attention_mask.dtype}")
    if torch.compiler.is_compiling():
        return  # the value checks below need the data (a host sync); under torch.compile only eager runs check them
    if attention_mask.dtype != torch.bool:
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 and 1 (1 = sample, 0 = padding)")
    mask = attention_mask.bool()
    lengths = mask.long().sum(-1)
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
    if not bool((mask == (positions < lengths[:, None])).all()):
        raise ValueError(
            "attention_mask must be right-padded (ones, then zeros) in every row; "
            "left padding or holes are not supported"
        )
    minimum = model.config.receptive_field()
    short = (lengths < minimum).nonzero().flatten().tolist()
    if short:
        raise ValueError(
            f"attention_mask rows {short} have {lengths[short].tolist()} valid samples; "
            f"at least {minimum} (the receptive field) are needed for one output frame"
        )


def check_head_mask(head_mask: Any, num_layers: int, num_heads: int) -> torch.Tensor:
    """Validate ``head_mask`` and return it as ``[num_layers, num_heads]``."""
    if not isinstance(head_mask, torch.Tensor):
        raise TypeError(f"head_mask must be a torch.Tensor, got {type(head_mask).__name__}")
    if head_mask.is_complex() or not (head_mask.is_floating_point() or head_mask.dtype == torch.bool):
        raise TypeError(f"head_mask must be a float (or bool) tensor, got {head_mask.dtype}")
    if head_mask.shape == (num_heads,):
        return head_mask[None, :].expand(num_layers, num_heads)
    if head_mask.shape == (num_layers, num_heads):
        return head_mask
    raise ValueError(
        f"head_mask must have shape (num_heads,) = ({num_heads},) or (num_layers, num_heads) = "
        f"({num_layers}, {num_heads}), got {tuple(head_mask.shape)}"
    )


# ------------------------------------------------------------------------------------------ backbone
class Backbone(PreTrainedModel):
    """UniSpeechModel / UniSpeechSatModel: conv features, projection, SpecAugment, encoder."""

    _always_masked_spec_embed: ClassVar[bool] = True

    def __init__(self, config: _BaseConfig, *, _init_weights: bool = True) -> None:
        super().__init__(config)
        self.feature_extractor = FeatureEncoder(config)
        self.feature_projection = FeatureProjection(config)
        if self._always_masked_spec_embed or config.mask_time_prob > 0.0 or config.mask_feature_prob > 0.0:
            self.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size).uniform_())
        self.encoder = Encoder(config)
        if _init_weights:  # a head initialises its whole tree once, backbone included
            self.post_init()

    def _mask_hidden_states(
        self,
        hidden_states: torch.Tensor,
        mask_time_indices: torch.Tensor | None,
        frame_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """SpecAugment: given (or, in training, sampled) time spans take ``masked_spec_embed``;
        sampled feature spans are zeroed. Off when ``config.apply_spec_augment`` is False."""
        config = self.config
        if not getattr(config, "apply_spec_augment", True):
            return hidden_states
        batch, frames, hidden = hidden_states.shape
        if mask_time_indices is None and config.mask_time_prob > 0 and self.training:
            mask_time_indices = torch.tensor(
                compute_mask_indices(
                    (batch, frames),
                    mask_prob=config.mask_time_prob,
                    mask_length=config.mask_time_length,
                    attention_mask=frame_mask,
                    min_masks=config.mask_time_min_masks,
                ),
                device=hidden_states.device,
                dtype=torch.bool,
            )
        if mask_time_indices is not None:
            if not hasattr(self, "masked_spec_embed"):
                raise ValueError(
                    "mask_time_indices needs masked_spec_embed, which this UniSpeech config lacks "
                    "(mask_time_prob and mask_feature_prob are both 0)"
                )
            embed = self.masked_spec_embed.to(hidden_states.dtype)
            hidden_states = torch.where(mask_time_indices[..., None], embed, hidden_states)
        if config.mask_feature_prob > 0 and self.training:
            feature_mask = torch.tensor(
                compute_mask_indices(
                    (batch, hidden),
                    mask_prob=config.mask_feature_prob,
                    mask_length=config.mask_feature_length,
                    min_masks=config.mask_feature_min_masks,
                ),
                device=hidden_states.device,
                dtype=torch.bool,
            )
            hidden_states = hidden_states.masked_fill(feature_mask[:, None, :], 0.0)
        return hidden_states

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        """Encode a batch of waveforms.

        Args:
            input_values: float ``[batch, samples]`` in the model's dtype.
            attention_mask: ``[batch, samples]``, 1 for samples and 0 for (right) padding.
            mask_time_indices: bool ``[batch, frames]``: frames replaced by ``masked_spec_embed``
                (applied in eval too, as in transformers, unless ``apply_spec_augment`` is False).
            head_mask: ``[num_heads]`` or ``[num_layers, num_heads]``; multiplies each head's
                attention probabilities (0 removes the head).
            output_attentions, output_hidden_states, return_dict: as in transformers.

        Returns:
            :class:`BaseModelOutput` (or its tuple).
        """
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
        last, extract_features, hidden_states, attentions = self._encode(
            input_values, attention_mask, mask_time_indices, head_mask, oa, oh
        )
        out = BaseModelOutput(last, extract_features, hidden_states, attentions)
        return out if rd else out.to_tuple()

    def _encode(self, input_values, attention_mask, mask_time_indices, head_mask, output_attentions,
                output_hidden_states, return_conv_features=False):
        """``(last, extract_features, hidden_states, attentions)``, plus the conv features ``[B, T, C]``
        before the feature projection's layer norm when ``return_conv_features``."""
        config = self.config
        check_input_values(self, input_values)
        if attention_mask is not None:
            check_attention_mask(self, attention_mask, input_values)
        if head_mask is not None:
            head_mask = check_head_mask(head_mask, config.num_hidden_layers, config.num_attention_heads)
            head_mask = head_mask.to(device=input_values.device, dtype=input_values.dtype)

        features = self.feature_extractor(input_values).transpose(1, 2)
        frames = features.shape[1]
        frame_mask = None
        if attention_mask is not None:
            frame_mask = self._get_feature_vector_attention_mask(frames, attention_mask)
        if mask_time_indices is not None:
            if not isinstance(mask_time_indices, torch.Tensor) or mask_time_indices.shape != (features.shape[0], frames):
                raise ValueError(
                    f"mask_time_indices must be a bool tensor of shape [batch, frames] = "
                    f"{(features.shape[0], frames)}, got "
                    f"{tuple(mask_time_indices.shape) if isinstance(mask_time_indices, torch.Tensor) else type(mask_time_indices).__name__}"
                )
            if mask_time_indices.dtype != torch.bool:
                raise TypeError(f"mask_time_indices must be a bool tensor, got {mask_time_indices.dtype}")
            mask_time_indices = mask_time_indices.to(device=features.device)

        hidden, extract_features = self.feature_projection(features)
        hidden = self._mask_hidden_states(hidden, mask_time_indices, frame_mask)
        last, hidden_states, attentions = self.encoder(
            hidden, frame_mask, head_mask, output_attentions, output_hidden_states
        )
        if return_conv_features:
            return last, extract_features, hidden_states, attentions, features
        return last, extract_features, hidden_states, attentions


def weighted_layer_sum(hidden_states: tuple[torch.Tensor, ...], layer_weights: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sum over the ``num_layers + 1`` recorded hidden states."""
    stacked = torch.stack(hidden_states, dim=1)
    norm_weights = F.softmax(layer_weights, dim=-1)
    return (stacked * norm_weights.view(-1, 1, 1)).sum(dim=1)
