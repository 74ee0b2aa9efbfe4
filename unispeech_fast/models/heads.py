"""Task heads shared by both families (transformers' ForCTC, ForSequenceClassification,
ForAudioFrameClassification, ForXVector) and the two pretraining heads."""

from __future__ import annotations

import contextlib
import functools
import inspect
import contextvars
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..pretraining import utterance_contrastive_loss
from ..modules import GumbelVectorQuantizer
from ..outputs import (
    CausalLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
    UniSpeechForPreTrainingOutput,
    UniSpeechSatForPreTrainingOutput,
    XVectorOutput,
)
from .base import Backbone, PreTrainedModel, check_input_values, weighted_layer_sum

# Per-call (per thread / per context) override of ``config.tdnn_lengths_use_dilation`` for ForXVector:
# :mod:`unispeech_fast.audio` sets it for its runs instead of writing the shared config.
_tdnn_lengths_use_dilation: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "unispeech_fast_tdnn_lengths_use_dilation", default=None)


@contextlib.contextmanager
def tdnn_lengths_use_dilation(enabled: bool = True) -> Iterator[None]:
    """ForXVector pools padded inputs over their own TDNN frames (the dilation counted) inside this
    block, in this thread/context only; the model and its config are left as they are."""
    token = _tdnn_lengths_use_dilation.set(bool(enabled))
    try:
        yield
    finally:
        _tdnn_lengths_use_dilation.reset(token)


__all__ = [
    "ForCTC",
    "ForSequenceClassification",
    "ForAudioFrameClassification",
    "ForXVector",
    "UniSpeechPreTrainingHead",
    "UniSpeechSatPreTrainingHead",
    "per_sample_draws",
]


def _check_class_labels(labels: Any, batch: int, num_labels: int, ignore_index: bool = True) -> torch.Tensor:
    """``labels [batch]`` class ids in ``[0, num_labels)``; with ``ignore_index`` also -100 (the cross-entropy
    heads skip it). The AM-softmax loss of the x-vector head has no ignore index: it passes ``False``."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of shape ({batch},), got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.numel() != batch:
        raise ValueError(f"labels must have shape ({batch},) (one class per sample), got {tuple(labels.shape)}")
    valid = labels[labels != -100] if ignore_index else labels
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_labels):
        allowed = ("or -100 to ignore" if ignore_index
                   else "(the AM-softmax loss has no ignore index: -100 is not allowed)")
        raise ValueError(
            f"labels must be in [0, {num_labels - 1}] (num_labels={num_labels}) {allowed}, "
            f"got values in [{int(valid.min())}, {int(valid.max())}]"
        )
    return labels


class _Head(PreTrainedModel):
    backbone_cls: ClassVar[type[Backbone]]

    def __init_subclass__(cls, **kwargs) -> None:
        """A head that defines ``_head_forward`` gets a ``forward`` whose docstring is the shared one
        followed by the head's own (its ``labels`` contract and outputs), so ``help(cls.forward)`` shows it."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("_head_forward")
        if own is None or "forward" in cls.__dict__ or not own.__doc__:
            return

        @functools.wraps(_Head.forward)
        def forward(self, *args, **kwargs):
            return _Head.forward(self, *args, **kwargs)

        own_doc = inspect.cleandoc(own.__doc__).replace("\n", "\n        ")
        forward.__doc__ = f"{_Head.forward.__doc__}\n\n        {cls.__name__}: {own_doc}"
        cls.forward = forward

    def _make_backbone(self, config) -> None:
        setattr(self, self.base_model_prefix, self.backbone_cls(config, _init_weights=False))

    def _make_layer_weights(self, config) -> None:
        """``layer_weights`` (num_layers + 1, uniform) when the head sums hidden states."""
        if config.use_weighted_layer_sum:
            n = config.num_hidden_layers + 1
            self.layer_weights = nn.Parameter(torch.ones(n) / n)

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ):
        """``input_values [B, samples]`` (and ``attention_mask``, 1 = sample) through the backbone and the
        head; ``labels`` and the outputs are each head's (its ``_head_forward``). Returns the head's
        output object, or its tuple with ``return_dict=False``. (The pretraining heads have their own.)"""
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
        out = self._head_forward(input_values, attention_mask, labels, mask_time_indices, head_mask, oa, oh)
        return out if rd else out.to_tuple()

    def _head_forward(self, input_values, attention_mask, labels, mask_time_indices, head_mask, oa, oh):
        """The head's forward with the output flags ``oa``/``oh`` resolved; returns its output object."""
        raise NotImplementedError

    def _run_backbone(self, input_values, attention_mask, mask_time_indices, head_mask, output_attentions,
                      output_hidden_states):
        return self.base_model._encode(
            input_values, attention_mask, mask_time_indices, head_mask, output_attentions, output_hidden_states
        )

    def _encode_for_classifier(self, input_values, attention_mask, mask_time_indices, head_mask,
                               output_attentions, output_hidden_states):
        """Backbone run for the classification heads: returns ``(hidden, hidden_states or None,
        attentions)`` with ``hidden`` the last hidden state or, with ``use_weighted_layer_sum``, the
        softmax-weighted sum of all recorded hidden states."""
        weighted = self.config.use_weighted_layer_sum
        last, _, hidden_states, attentions = self._run_backbone(
            input_values, attention_mask, mask_time_indices, head_mask, output_attentions,
            output_hidden_states or weighted,
        )
        hidden = weighted_layer_sum(hidden_states, self.layer_weights) if weighted else last
        return hidden, hidden_states if output_hidden_states else None, attentions

    #: Whether the loss skips label -100 (cross-entropy heads); the x-vector head's AM-softmax does not.
    _ignores_label_minus_100: ClassVar[bool] = True

    def _encode_for_class_labels(self, input_values, attention_mask, labels, mask_time_indices, head_mask, oa, oh):
        """:meth:`_encode_for_classifier` after checking ``input_values`` and the class ``labels [batch]``."""
        check_input_values(self, input_values)
        if labels is not None:
            _check_class_labels(labels, input_values.shape[0], self.config.num_labels, self._ignores_label_minus_100)
        return self._encode_for_classifier(input_values, attention_mask, mask_time_indices, head_mask, oa, oh)


class ForCTC(_Head):
    """Backbone + dropout + ``lm_head`` (H -> vocab_size), CTC loss with blank = ``pad_token_id``."""

    def __init__(self, config, target_lang: str | None = None) -> None:
        super().__init__(config)
        if target_lang is not None:
            raise NotImplementedError(
                "target_lang adapters are not supported for UniSpeech models (transformers routes them to "
                "PEFT's load_adapter, which cannot load them either)"
            )
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set to build a CTC head")
        self._make_backbone(config)
        self.dropout = nn.Dropout(config.final_dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _head_forward(
        self, input_values, attention_mask, labels, mask_time_indices, head_mask, oa, oh
    ) -> CausalLMOutput:
        """``labels`` ``[batch, target_len]`` with ids in ``[0, vocab_size)``; -100 and ``pad_token_id``
        entries are padding. Returns ``CausalLMOutput(loss, logits [B, T, vocab], ...)``."""
        check_input_values(self, input_values)
        if labels is not None:
            if (not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex()
                    or labels.dtype == torch.bool):
                raise TypeError("labels must be an integer tensor of shape [batch, target_length]")
            if labels.dim() != 2 or labels.shape[0] != input_values.shape[0]:
                raise ValueError(
                    f"labels must have shape [batch={input_values.shape[0]}, target_length], got {tuple(labels.shape)}"
                )
            if labels.numel() and int(labels.max()) >= self.config.vocab_size:
                raise ValueError(f"Label values must be <= vocab_size: {self.config.vocab_size} "
                                 f"(labels must be in [0, {self.config.vocab_size - 1}], got max {int(labels.max())})")
            bad = (labels < 0) & (labels != -100)
            if bool(bad.any()):
                raise ValueError("labels must be in [0, vocab_size) or -100 for padding, got negative values")
        last, _, hidden_states, attentions = self._run_backbone(
            input_values, attention_mask, mask_time_indices, head_mask, oa, oh
        )
        logits = self.lm_head(self.dropout(last))
        loss = None
        if labels is not None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_values, dtype=torch.long)
            input_lengths = self._get_feat_extract_output_lengths(mask.long().sum(-1)).to(torch.long)
            loss = ctc_loss(logits, labels, input_lengths, self.config)
        return CausalLMOutput(loss, logits, hidden_states, attentions)


def ctc_loss(logits: torch.Tensor, labels: torch.Tensor, logit_lengths: torch.Tensor, config) -> torch.Tensor:
    """transformers' ``ForCTCLoss``: labels equal to -100 or to the blank (pad) id are padding."""
    return _ctc(logits, labels, logit_lengths, config.pad_token_id, config.ctc_loss_reduction, config.ctc_zero_infinity)


def _ctc(logits: torch.Tensor, labels: torch.Tensor, logit_lengths: torch.Tensor, blank: int, reduction: str,
         zero_infinity: bool) -> torch.Tensor:
    """CTC on ``logits [B, T, C]``; labels equal to -100 or to ``blank`` are padding."""
    labels = labels.to(logits.device)
    labels_mask = (labels != -100) & (labels != blank)
    target_lengths = labels_mask.sum(-1)
    targets = labels.masked_select(labels_mask)
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(
            log_probs,
            targets,
            logit_lengths,
            target_lengths,
            blank=blank,
            reduction=reduction,
            zero_infinity=zero_infinity,
        )


class ForSequenceClassification(_Head):
    """Backbone (or softmax-weighted layer sum) -> ``projector`` -> masked mean over frames -> ``classifier``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self._make_backbone(config)
        self._make_layer_weights(config)
        self.projector = nn.Linear(config.hidden_size, config.classifier_proj_size)
        self.classifier = nn.Linear(config.classifier_proj_size, config.num_labels)
        self.post_init()

    def _head_forward(
        self, input_values, attention_mask, labels, mask_time_indices, head_mask, oa, oh
    ) -> SequenceClassifierOutput:
        """``labels`` ``[batch]`` class ids. Returns ``SequenceClassifierOutput(loss, logits [B, num_labels], ...)``."""
        hidden, hidden_states, attentions = self._encode_for_class_labels(
            input_values, attention_mask, labels, mask_time_indices, head_mask, oa, oh
        )
        hidden = self.projector(hidden)
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            frame_mask = self._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
            hidden = hidden.masked_fill(~frame_mask[..., None], 0.0)
            pooled = hidden.sum(dim=1) / frame_mask.sum(dim=1).view(-1, 1)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss, logits, hidden_states, attentions)


class ForAudioFrameClassification(_Head):
    """Per-frame ``classifier`` (H -> num_labels) on the backbone output (or weighted layer sum)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self._make_backbone(config)
        self._make_layer_weights(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.num_labels = config.num_labels
        self.post_init()

    def _head_forward(
        self, input_values, attention_mask, labels, mask_time_indices, head_mask, oa, oh
    ) -> TokenClassifierOutput:
        """``labels`` ``[batch, frames, num_labels]`` one-/multi-hot; the loss is cross-entropy against
        their argmax over every frame, padded frames included (as transformers computes it)."""
        hidden, hidden_states, attentions = self._encode_for_classifier(
            input_values, attention_mask, mask_time_indices, head_mask, oa, oh
        )
        logits = self.classifier(hidden)
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape:
                raise ValueError(
                    f"labels must have shape [batch, frames, num_labels] = {tuple(logits.shape)}, got "
                    f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
                )
            loss = F.cross_entropy(
                logits.view(-1, self.num_labels), torch.argmax(labels.view(-1, self.num_labels), dim=1)
            )
        return TokenClassifierOutput(loss, logits, hidden_states, attentions)


# ------------------------------------------------------------------------------------ x-vector layers
# Modules only the ForXVector head uses (the backbone's layers are in unispeech_fast.modules).
class TDNNLayer(nn.Module):
    """X-vector TDNN layer: dilated conv over frames (weights stored as a Linear ``kernel``), then ReLU."""

    READS_WEIGHTS_OF = ("kernel",)  # see unispeech_fast.modules.ConvLayer.READS_WEIGHTS_OF

    def __init__(self, config, layer_id: int) -> None:
        super().__init__()
        self.in_conv_dim = config.tdnn_dim[layer_id - 1] if layer_id > 0 else config.tdnn_dim[layer_id]
        self.out_conv_dim = config.tdnn_dim[layer_id]
        self.kernel_size = config.tdnn_kernel[layer_id]
        self.dilation = config.tdnn_dilation[layer_id]
        self.kernel = nn.Linear(self.in_conv_dim * self.kernel_size, self.out_conv_dim)
        self.activation = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, in_conv_dim]`` to ``[B, T - dilation * (kernel_size - 1), out_conv_dim]``."""
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

    @torch.no_grad()
    def init_weights_like_transformers(self) -> None:
        """transformers' ``_init_weights`` for this module (called by :func:`unispeech_fast.modules.init_weights`)."""
        nn.init.normal_(self.weight)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, input_dim]`` and labels ``[B]`` (or any shape holding B ids) to the scalar loss."""
        labels = labels.flatten()
        weight = F.normalize(self.weight, dim=0)
        cos_theta = torch.mm(F.normalize(hidden_states, dim=1), weight)
        psi = cos_theta - self.margin
        onehot = F.one_hot(labels, self.num_labels)
        logits = self.scale * torch.where(onehot.bool(), psi, cos_theta)
        return self.loss(logits, labels)


class ForXVector(_Head):
    """Projector -> TDNN stack -> mean/std statistics pooling -> ``feature_extractor`` (embeddings) ->
    ``classifier``; AM-softmax loss on the classifier output (``logits``, of size xvector_output_dim)."""

    _ignores_label_minus_100 = False  # transformers' AMSoftmaxLoss has no ignore index

    def __init__(self, config) -> None:
        super().__init__(config)
        self._make_backbone(config)
        self._make_layer_weights(config)
        self.projector = nn.Linear(config.hidden_size, config.tdnn_dim[0])
        self.tdnn = nn.ModuleList(TDNNLayer(config, i) for i in range(len(config.tdnn_dim)))
        self.feature_extractor = nn.Linear(config.tdnn_dim[-1] * 2, config.xvector_output_dim)
        self.classifier = nn.Linear(config.xvector_output_dim, config.xvector_output_dim)
        self.objective = AMSoftmaxLoss(config.xvector_output_dim, config.num_labels)
        self.post_init()

    def _get_tdnn_output_lengths(self, input_lengths: torch.Tensor | int) -> torch.Tensor | int:
        """Frames left after the TDNN stack. transformers ignores the dilation here (so padded samples
        pool over a few frames past their end); ``config.tdnn_lengths_use_dilation=True`` fixes it, as does
        :func:`tdnn_lengths_use_dilation` for the calls inside its block."""
        use_dilation = _tdnn_lengths_use_dilation.get()
        if use_dilation is None:
            use_dilation = bool(getattr(self.config, "tdnn_lengths_use_dilation", False))
        for kernel, dilation in zip(self.config.tdnn_kernel, self.config.tdnn_dilation):
            input_lengths = input_lengths - (kernel - 1) * (dilation if use_dilation else 1)
        return input_lengths

    def _head_forward(
        self, input_values, attention_mask, labels, mask_time_indices, head_mask, oa, oh
    ) -> XVectorOutput:
        """``labels`` ``[batch]`` speaker ids in ``[0, num_labels)`` (no -100: the AM-softmax loss ignores no label).
        Returns ``XVectorOutput(loss, logits, embeddings, ...)``."""
        hidden, hidden_states, attentions = self._encode_for_class_labels(
            input_values, attention_mask, labels, mask_time_indices, head_mask, oa, oh
        )
        needed = 2 + sum((k - 1) * d for k, d in zip(self.config.tdnn_kernel, self.config.tdnn_dilation))
        if hidden.shape[1] < needed:
            raise ValueError(
                f"input_values gives {hidden.shape[1]} frame(s); the x-vector TDNN stack and statistics pooling "
                f"need at least {needed}: use longer inputs"
            )
        hidden = self.projector(hidden)
        for layer in self.tdnn:
            hidden = layer(hidden)
        if attention_mask is None:
            mean, std = hidden.mean(dim=1), hidden.std(dim=1)
        else:
            lengths = self._get_tdnn_output_lengths(
                self._get_feat_extract_output_lengths(attention_mask.long().sum(dim=1))
            )
            means, stds = [], []
            for i, length in enumerate(lengths.tolist()):
                if length < 2:
                    raise ValueError(
                        f"sample {i} has {max(length, 0)} frame(s) after the TDNN stack; statistics pooling "
                        "needs at least 2: use longer inputs"
                    )
                means.append(hidden[i, :length].mean(dim=0))
                stds.append(hidden[i, :length].std(dim=0))
            mean, std = torch.stack(means), torch.stack(stds)
        embeddings = self.feature_extractor(torch.cat([mean, std], dim=-1))
        logits = self.classifier(embeddings)
        loss = self.objective(logits, labels) if labels is not None else None
        return XVectorOutput(loss, logits, embeddings, hidden_states, attentions)


class _PreTrainingHead(_Head):
    """What both pretraining heads share: the quantizer branch, the frame mask, the diversity term and
    the in-model draws of the seeding rule."""

    def _make_quantizer_branch(self, config, quantizer_in: int, hid_in: int, hid_out: int) -> None:
        """The backbone, ``dropout_features``, ``quantizer``, ``project_q`` and ``project_hid``, in
        transformers' order (the initialisation draws follow it)."""
        self._make_backbone(config)
        self.dropout_features = nn.Dropout(config.feat_quantizer_dropout)
        self.quantizer = GumbelVectorQuantizer(config, in_dim=quantizer_in)
        self.project_q = nn.Linear(config.codevector_dim, config.proj_codevector_dim)
        self.project_hid = nn.Linear(hid_in, hid_out)

    def set_gumbel_temperature(self, temperature: float) -> None:
        """Set the quantizer's Gumbel-softmax temperature (used in training; anneal it per step)."""
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.quantizer.temperature = temperature

    def _frame_mask(self, frames: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if attention_mask is None else self._get_feature_vector_attention_mask(frames, attention_mask)

    def _diversity_loss(self, perplexity: torch.Tensor, num_masked: torch.Tensor) -> torch.Tensor:
        """``(G*V - perplexity) / (G*V) * N``."""
        num_codes = self.config.num_codevectors_per_group * self.config.num_codevector_groups
        return (num_codes - perplexity) / num_codes * num_masked

    def _sample_draws(self, seeds: list[int], frame_mask, batch: int, frames: int, device,
                      replace_prob: float | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:func:`per_sample_draws` over each sample's frames: the replace mix (with ``replace_prob``)
        and, in training, the quantizer's Gumbel noise."""
        lengths = frame_mask.sum(-1).tolist() if frame_mask is not None else [frames] * batch
        return per_sample_draws(seeds, lengths, frames, device, replace_prob,
                                self.quantizer.gumbel_width if self.quantizer.training else 0)


def _check_pretraining_masks(mask_time_indices, frame_mask, batch, frames, device) -> torch.Tensor:
    """The masked frames as bool ``[B, T]`` on ``device``; masked padding and empty masks are errors."""
    if not isinstance(mask_time_indices, torch.Tensor) or mask_time_indices.dtype != torch.bool or \
            tuple(mask_time_indices.shape) != (batch, frames):
        raise ValueError(f"mask_time_indices must be a bool tensor [batch, frames] = {(batch, frames)} to compute "
                         "the pre-training loss (see unispeech_fast.pretraining.compute_mask_indices)")
    mask = mask_time_indices.to(device)
    if frame_mask is not None and bool((mask & ~frame_mask).any()):
        raise ValueError("mask_time_indices masks padded frames; compute it with the frame-level attention mask "
                         "(compute_mask_indices(..., attention_mask=...)) so padding is never a target")
    if not bool(mask.any()):
        raise ValueError("mask_time_indices masks no frame: the pre-training losses need at least one masked frame")
    return mask


def _check_frame_labels(name: str, labels, batch: int, frames: int | None, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or \
            labels.dtype == torch.bool or labels.dim() != 2 or labels.shape[0] != batch or \
            (frames is not None and labels.shape[1] != frames):
        want = f"[batch={batch}, frames={frames}]" if frames is not None else f"[batch={batch}, target_length]"
        got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be an integer tensor {want}, got {got}")
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise ValueError(f"{name} must be in [0, {num_classes}) or -100 to ignore, got values in "
                         f"[{int(valid.min())}, {int(valid.max())}]")
    return labels


def _check_noise_seeds(noise_seeds, batch: int) -> list[int]:
    if not isinstance(noise_seeds, torch.Tensor) or noise_seeds.dtype != torch.int64 or \
            tuple(noise_seeds.shape) != (batch,):
        got = (f"{tuple(noise_seeds.shape)} {noise_seeds.dtype}" if isinstance(noise_seeds, torch.Tensor)
               else type(noise_seeds).__name__)
        raise ValueError(f"noise_seeds must be an int64 tensor [batch={batch}], one seed per sample "
                         f"(SpeechDataCollator(..., noise_seeds=True) makes it), got {got}")
    seeds = noise_seeds.tolist()
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"noise_seeds must be non-negative, got {min(seeds)}")
    return seeds


def per_sample_draws(seeds: list[int], lengths: list[int], frames: int, device, replace_prob: float | None = None,
                     gumbel_width: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The in-model draws of the seeding rule (README "Training"): sample ``b``'s own generator, seeded
    by ``seeds[b]``, draws over its ``lengths[b]`` frames, in this order, the replace mix (with
    ``replace_prob``: bool ``[B, frames]``, ``U(0, 1) < replace_prob`` per frame) and the Gumbel noise
    (with ``gumbel_width``: float32 ``[B, frames, gumbel_width]``, ``-log(Exp(1))`` as
    ``F.gumbel_softmax`` draws it). Padded frames get False and 0. A sample's draws depend on its
    seed and its own frame count only: not on its rank, its batch or the batch's padded length."""
    batch = len(seeds)
    replace = None if replace_prob is None else torch.zeros(batch, frames, dtype=torch.bool, device=device)
    gumbels = None if not gumbel_width else torch.zeros(batch, frames, gumbel_width, device=device)
    for b, (seed, length) in enumerate(zip(seeds, lengths)):
        generator = torch.Generator(device=device).manual_seed(seed)
        if replace is not None:
            replace[b, :length] = torch.rand(length, generator=generator, device=device) < replace_prob
        if gumbels is not None:
            noise = torch.empty(length, gumbel_width, device=device).exponential_(generator=generator)
            gumbels[b, :length] = -noise.log()
    return replace, gumbels


def _cosine_logits(x: torch.Tensor, embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """``cos(x_i, e_c) / temperature`` for every row of ``x [..., D]`` and ``embeddings [C, D]``."""
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    e = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (x @ e.to(x.dtype).t()) / temperature


class UniSpeechPreTrainingHead(_PreTrainingHead):
    """``UniSpeechForPreTraining``: transformers' module layout, plus the authors' multitask loss.

    Forward: the backbone (with ``mask_time_indices`` applied) gives the encoder output ``h``
    (``projected_states``); the Gumbel quantizer over ``dropout_features(extract_features)``, then
    ``project_q`` and ``project_hid``, gives ``y`` (``projected_quantized_states``).

    Loss (only with ``sampled_negative_indices``; N = number of masked frames):

    * ``contrastive_loss``: :func:`unispeech_fast.ops.contrastive_loss` with prediction ``h`` and
      target ``y`` (the authors' "transpose" mode), negatives equal to the positive excluded by code
      index, cross-entropy summed over masked frames;
    * ``diversity_loss = (G*V - perplexity) / (G*V) * N``, the perplexity over the masked non-padded
      frames (the quantizer's mask input);
    * with ``labels``: ``ctc_loss``, CTC (summed) on ``ctc_proj(dropout(mix))`` where ``mix`` takes
      per frame ``y`` with probability ``replace_prob`` else ``h``; blank =
      ``config.pretraining_ctc_blank_id`` (None: ``pad_token_id``); labels equal to -100 or to the
      blank are padding;
    * ``loss = (1 - a) * (contrastive_loss + diversity_loss_weight * diversity_loss) + a * ctc_loss``
      with ``a = pretraining_ctc_weight``, or ``contrastive_loss + diversity_loss_weight *
      diversity_loss`` without labels. Divide by N for the authors' per-frame normalisation.

    Without ``sampled_negative_indices`` (and labels) the forward is transformers' exactly: ``loss``
    is None, the perplexity runs over every frame, and the CTC branch's random draws are still made
    (its result unused) so the torch RNG stream matches transformers'.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        self._make_quantizer_branch(config, config.conv_dim[-1], config.proj_codevector_dim, config.hidden_size)
        self.ctc_proj = nn.Linear(config.hidden_size, config.num_ctc_classes)
        self.dropout = nn.Dropout(config.final_dropout)
        self.post_init()

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        sampled_negative_indices: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        noise_seeds: torch.Tensor | None = None,
    ) -> UniSpeechForPreTrainingOutput | tuple:
        """``mask_time_indices`` bool ``[B, T]``; ``sampled_negative_indices`` ``[B, T, K]`` into the
        flattened ``B*T`` axis (:func:`unispeech_fast.pretraining.sample_negative_indices`);
        ``labels`` ``[B, target_len]`` phone ids in ``[0, num_ctc_classes)``; ``noise_seeds`` int64
        ``[B]``: the replace mix and (in training) the Gumbel noise come from per-sample generators
        (:func:`per_sample_draws`) instead of torch's global one. See the class docstring."""
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
        if labels is not None and sampled_negative_indices is None:
            raise ValueError("labels (the phone CTC branch) need sampled_negative_indices and mask_time_indices: "
                             "the pre-training loss combines CTC with the contrastive loss; use UniSpeechForCTC "
                             "for CTC alone")
        with_loss = sampled_negative_indices is not None
        last, extract_features, hidden_states, attentions = self._run_backbone(
            input_values, attention_mask, mask_time_indices, head_mask, oa, oh
        )
        batch, frames = last.shape[:2]
        frame_mask = self._frame_mask(frames, attention_mask)
        replace = gumbels = None
        if noise_seeds is not None:
            replace, gumbels = self._sample_draws(_check_noise_seeds(noise_seeds, batch), frame_mask, batch, frames,
                                                  last.device, self.config.replace_prob)
        noise = {} if gumbels is None else {"gumbels": gumbels}
        mask = codes = None
        if with_loss:
            mask = _check_pretraining_masks(mask_time_indices, frame_mask, batch, frames, last.device)
            if labels is not None:
                blank = self._ctc_blank()
                _check_frame_labels("labels", labels, batch, None, self.config.num_ctc_classes)
            quantized, perplexity, codes = self.quantizer(self.dropout_features(extract_features), mask=mask,
                                                          return_indices=True, **noise)
        else:
            quantized, perplexity = self.quantizer(self.dropout_features(extract_features), **noise)
        quantized = self.project_hid(self.project_q(quantized.to(self.project_q.weight.dtype)))
        if replace is None:
            # The replace mix of the CTC branch: R ~ Bernoulli(replace_prob) per frame, drawn on a [T, B]
            # matrix as the authors (and transformers' dead code) do, so the RNG stream matches transformers'.
            replace = torch.bernoulli(
                torch.full((last.size(0), last.size(1)), self.config.replace_prob, device=last.device).transpose(0, 1)
            ).bool().transpose(0, 1)
        replace = replace[..., None]
        ctc_loss = None
        if labels is not None:
            mixed = last.masked_fill(replace, 0.0) + quantized.masked_fill(~replace, 0.0)
            ctc_logits = self.ctc_proj(self.dropout(mixed))
            lengths = (frame_mask.sum(-1) if frame_mask is not None
                       else torch.full((batch,), frames, device=last.device, dtype=torch.long))
            ctc_loss = _ctc(ctc_logits, labels, lengths, blank, "sum", self.config.ctc_zero_infinity)  # authors: summed
        elif self.training and self.dropout.p > 0:
            # transformers' dead branch, kept only for its dropout draws (see the class docstring).
            self.dropout(last.detach().masked_fill(replace, 0.0) + quantized.detach().masked_fill(~replace, 0.0))
        loss = contrastive = diversity = None
        if with_loss:
            contrastive = ops.contrastive_loss(last, quantized.to(last.dtype), sampled_negative_indices.to(last.device),
                                               mask, self.config.contrastive_logits_temperature, code_indices=codes)
            diversity = self._diversity_loss(perplexity, mask.sum())
            loss = contrastive + self.config.diversity_loss_weight * diversity
            if ctc_loss is not None:
                a = self.config.pretraining_value("pretraining_ctc_weight")
                loss = (1 - a) * loss + a * ctc_loss
        out = UniSpeechForPreTrainingOutput(loss, last, quantized, perplexity, hidden_states, attentions,
                                            contrastive, diversity, ctc_loss)
        return out if rd else out.to_tuple()

    def _ctc_blank(self) -> int:
        blank = self.config.pretraining_value("pretraining_ctc_blank_id")
        blank = self.config.pad_token_id if blank is None else blank
        if not isinstance(blank, int) or not 0 <= blank < self.config.num_ctc_classes:
            raise ValueError(f"the CTC blank (pretraining_ctc_blank_id, else pad_token_id) must be in "
                             f"[0, num_ctc_classes={self.config.num_ctc_classes}), got {blank!r}")
        return blank


class UniSpeechSatPreTrainingHead(_PreTrainingHead):
    """``UniSpeechSatForPreTraining``: transformers' module layout, plus the authors' objectives.

    Without ``labels`` the forward is transformers' (``logits = dropout_features(extract_features)``,
    ``projected_states`` = the encoder output, ``loss`` None). With ``labels`` (frame cluster ids
    ``[B, T]``, -100 ignored) and ``mask_time_indices`` (N = number of masked frames):

    * ``prediction_logits [B, T, num_clusters] = cos(project_hid(h_t), label_embeddings_concat[c]) /
      contrastive_logits_temperature``; ``prediction_loss`` = cross-entropy summed over masked frames
      whose label is not -100 (HuBERT's masked prediction);
    * ``utterance_contrastive_loss``: on layer ``L = utterance_contrastive_layer`` (output of layer L;
      for pre-LN models through ``layer_norm_for_extract`` unless L is the last layer, whose output is
      already normed), masked frames only: ``p = speaker_proj(h)``, ``y = project_q(quantizer(h))``;
      per frame the candidates are its own ``y`` and ``num_utterance_negatives`` draws uniform over all
      masked frames of the batch (torch's global RNG), label 1 when from the same utterance;
      ``BCEWithLogits(cos(p, candidate) / temperature)`` averaged over the candidates, summed over
      frames (the authors' mean times N);
    * ``diversity_loss = (G*V - perplexity) / (G*V) * N``, the perplexity of that quantizer over the
      masked frames (``codevector_perplexity``);
    * ``feature_penalty = mean(conv_features^2) * N`` over the non-padded frames (conv output before
      the feature projection's layer norm);
    * ``loss = prediction_loss + utterance_contrastive_loss_weight * utterance_contrastive_loss +
      diversity_loss_weight * diversity_loss + feature_penalty_weight * feature_penalty``.
      Divide by N for the authors' per-frame normalisation.

    The cosine terms need ``proj_codevector_dim == codevector_dim`` (true of the released configs).
    ``label_embeddings_concat`` starts uniform in [0, 1) as the authors initialise it (transformers'
    zeros give every cluster the same cosine, so nothing trains); loaded checkpoints keep their values.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        self._make_quantizer_branch(config, config.hidden_size, config.hidden_size, config.proj_codevector_dim)
        self.dropout = nn.Dropout(config.final_dropout)
        self.speaker_proj = nn.Linear(config.hidden_size, config.codevector_dim)
        self.label_embeddings_concat = nn.Parameter(torch.zeros(config.num_clusters, config.codevector_dim))
        self.layer_norm_for_extract = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()
        with torch.no_grad():
            self.label_embeddings_concat.uniform_()

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        noise_seeds: torch.Tensor | None = None,
    ) -> UniSpeechSatForPreTrainingOutput | tuple:
        """``labels`` ``[B, T]`` frame cluster ids in ``[0, num_clusters)`` or -100; ``noise_seeds`` int64
        ``[B]``: in training, the Gumbel noise of a masked frame is its sample's (:func:`per_sample_draws`,
        rows of the masked frames) instead of a draw from torch's global generator. See the class docstring."""
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
        if labels is None:
            last, extract_features, hidden_states, attentions = self._run_backbone(
                input_values, attention_mask, mask_time_indices, head_mask, oa, oh
            )
            if noise_seeds is not None:
                _check_noise_seeds(noise_seeds, last.shape[0])
            logits = self.dropout_features(extract_features)
            out = UniSpeechSatForPreTrainingOutput(None, logits, last, None, None, hidden_states, attentions)
            return out if rd else out.to_tuple()

        config = self.config
        if config.proj_codevector_dim != config.codevector_dim:
            raise ValueError(f"the UniSpeech-SAT pre-training loss compares projections by cosine and needs "
                             f"proj_codevector_dim == codevector_dim, got {config.proj_codevector_dim} and "
                             f"{config.codevector_dim}")
        last, extract_features, all_hidden, attentions, conv = self.base_model._encode(
            input_values, attention_mask, mask_time_indices, head_mask, oa, True, return_conv_features=True
        )
        logits = self.dropout_features(extract_features)
        batch, frames = last.shape[:2]
        frame_mask = self._frame_mask(frames, attention_mask)
        mask = _check_pretraining_masks(mask_time_indices, frame_mask, batch, frames, last.device)
        labels = _check_frame_labels("labels", labels, batch, frames, config.num_clusters).to(last.device)
        seeds = None if noise_seeds is None else _check_noise_seeds(noise_seeds, batch)
        num_masked = mask.sum()
        temperature = config.contrastive_logits_temperature

        # Masked prediction of the cluster ids.
        prediction_logits = _cosine_logits(self.project_hid(last), self.label_embeddings_concat, temperature)
        scored = mask & (labels != -100)
        prediction_loss = F.cross_entropy(prediction_logits[scored].float(), labels[scored], reduction="sum")

        # Utterance-wise contrastive loss on layer L, over the masked frames.
        layer = config.pretraining_value("utterance_contrastive_layer") or config.num_hidden_layers // 2
        h = all_hidden[layer]
        if config.do_stable_layer_norm and layer < config.num_hidden_layers:
            h = self.layer_norm_for_extract(h)
        h = h[mask]  # [M, H]
        speaker = self.speaker_proj(h)
        noise = {}
        if seeds is not None and self.quantizer.training:
            noise["gumbels"] = self._sample_draws(seeds, frame_mask, batch, frames, last.device)[1][mask][None]
        quantized, perplexity = self.quantizer(h[None], **noise)
        targets = self.project_q(quantized[0].to(self.project_q.weight.dtype))
        utterance = mask.nonzero()[:, 0]  # the row of each masked frame
        m = h.shape[0]
        candidates = torch.randint(0, m, (m, config.pretraining_value("num_utterance_negatives")), device=h.device)
        utterance_loss = utterance_contrastive_loss(speaker, targets, utterance, candidates, temperature)

        diversity_loss = self._diversity_loss(perplexity, num_masked)
        valid = frame_mask if frame_mask is not None else torch.ones_like(mask)
        feature_penalty = conv[valid].float().pow(2).mean() * num_masked
        loss = (prediction_loss
                + config.pretraining_value("utterance_contrastive_loss_weight") * utterance_loss
                + config.diversity_loss_weight * diversity_loss
                + config.pretraining_value("feature_penalty_weight") * feature_penalty)
        out = UniSpeechSatForPreTrainingOutput(
            loss, logits, last, None, perplexity, all_hidden if oh else None, attentions,
            prediction_loss, utterance_loss, diversity_loss, feature_penalty, prediction_logits,
        )
        return out if rd else out.to_tuple()
