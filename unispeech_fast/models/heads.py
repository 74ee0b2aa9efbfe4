"""Task heads shared by both families (transformers' ForCTC, ForSequenceClassification,
ForAudioFrameClassification, ForXVector) and the two pretraining heads."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import AMSoftmaxLoss, GumbelVectorQuantizer, TDNNLayer
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
]


def _check_class_labels(labels: Any, batch: int, num_labels: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of shape ({batch},), got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.numel() != batch:
        raise ValueError(f"labels must have shape ({batch},) (one class per sample), got {tuple(labels.shape)}")
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_labels):
        raise ValueError(
            f"labels must be in [0, {num_labels - 1}] (num_labels={num_labels}) or -100 to ignore, "
            f"got values in [{int(valid.min())}, {int(valid.max())}]"
        )
    return labels


class _Head(PreTrainedModel):
    backbone_cls: ClassVar[type[Backbone]]

    def _make_backbone(self, config) -> None:
        setattr(self, self.base_model_prefix, self.backbone_cls(config, _init_weights=False))

    def _make_layer_weights(self, config) -> None:
        """``layer_weights`` (num_layers + 1, uniform) when the head sums hidden states."""
        if config.use_weighted_layer_sum:
            n = config.num_hidden_layers + 1
            self.layer_weights = nn.Parameter(torch.ones(n) / n)

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
    ) -> CausalLMOutput | tuple:
        """``labels`` ``[batch, target_len]`` with ids in ``[0, vocab_size)``; -100 and ``pad_token_id``
        entries are padding. Returns ``CausalLMOutput(loss, logits [B, T, vocab], ...)``."""
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
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
        out = CausalLMOutput(loss, logits, hidden_states, attentions)
        return out if rd else out.to_tuple()


def ctc_loss(logits: torch.Tensor, labels: torch.Tensor, logit_lengths: torch.Tensor, config) -> torch.Tensor:
    """transformers' ``ForCTCLoss``: labels equal to -100 or to the blank (pad) id are padding."""
    blank = config.pad_token_id
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
            reduction=config.ctc_loss_reduction,
            zero_infinity=config.ctc_zero_infinity,
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
    ) -> SequenceClassifierOutput | tuple:
        """``labels`` ``[batch]`` class ids. Returns ``SequenceClassifierOutput(loss, logits [B, num_labels], ...)``."""
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
        check_input_values(self, input_values)
        if labels is not None:
            _check_class_labels(labels, input_values.shape[0], self.config.num_labels)
        hidden, hidden_states, attentions = self._encode_for_classifier(
            input_values, attention_mask, mask_time_indices, head_mask, oa, oh
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
        out = SequenceClassifierOutput(loss, logits, hidden_states, attentions)
        return out if rd else out.to_tuple()


class ForAudioFrameClassification(_Head):
    """Per-frame ``classifier`` (H -> num_labels) on the backbone output (or weighted layer sum)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self._make_backbone(config)
        self._make_layer_weights(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.num_labels = config.num_labels
        self.post_init()

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
    ) -> TokenClassifierOutput | tuple:
        """``labels`` ``[batch, frames, num_labels]`` one-/multi-hot; the loss is cross-entropy against
        their argmax over every frame, padded frames included (as transformers computes it)."""
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
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
        out = TokenClassifierOutput(loss, logits, hidden_states, attentions)
        return out if rd else out.to_tuple()


class ForXVector(_Head):
    """Projector -> TDNN stack -> mean/std statistics pooling -> ``feature_extractor`` (embeddings) ->
    ``classifier``; AM-softmax loss on the classifier output (``logits``, of size xvector_output_dim)."""

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
    ) -> XVectorOutput | tuple:
        """``labels`` ``[batch]`` speaker ids. Returns ``XVectorOutput(loss, logits, embeddings, ...)``."""
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
        check_input_values(self, input_values)
        if labels is not None:
            _check_class_labels(labels, input_values.shape[0], self.config.num_labels)
        hidden, hidden_states, attentions = self._encode_for_classifier(
            input_values, attention_mask, mask_time_indices, head_mask, oa, oh
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
        out = XVectorOutput(loss, logits, embeddings, hidden_states, attentions)
        return out if rd else out.to_tuple()


class _PreTrainingHead(_Head):
    def set_gumbel_temperature(self, temperature: float) -> None:
        """Set the quantizer's Gumbel-softmax temperature (used in training; anneal it per step)."""
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.quantizer.temperature = temperature


class UniSpeechPreTrainingHead(_PreTrainingHead):
    """transformers' ``UniSpeechForPreTraining``: quantizes ``extract_features`` with the Gumbel
    quantizer and projects them (``project_q`` then ``project_hid``) to the hidden size.

    As in transformers, no loss is computed (``loss`` is None) and the phoneme-CTC mixing branch is
    dead code; its random draws (``torch.bernoulli`` on a [T, B] matrix, and the dropout in
    training) are still made so the torch RNG stream stays identical, but ``ctc_proj`` is skipped.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        self._make_backbone(config)
        self.dropout_features = nn.Dropout(config.feat_quantizer_dropout)
        self.quantizer = GumbelVectorQuantizer(config, in_dim=config.conv_dim[-1])
        self.project_q = nn.Linear(config.codevector_dim, config.proj_codevector_dim)
        self.project_hid = nn.Linear(config.proj_codevector_dim, config.hidden_size)
        self.ctc_proj = nn.Linear(config.hidden_size, config.num_ctc_classes)
        self.dropout = nn.Dropout(config.final_dropout)
        self.post_init()

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> UniSpeechForPreTrainingOutput | tuple:
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
        last, extract_features, hidden_states, attentions = self._run_backbone(
            input_values, attention_mask, mask_time_indices, head_mask, oa, oh
        )
        quantized, perplexity = self.quantizer(self.dropout_features(extract_features))
        quantized = self.project_hid(self.project_q(quantized.to(self.project_q.weight.dtype)))
        # Dead branch kept only for its RNG draws (see the class docstring).
        replace = torch.bernoulli(
            torch.full((last.size(0), last.size(1)), self.config.replace_prob, device=last.device).transpose(0, 1)
        ).bool().transpose(0, 1)[..., None]
        if self.training and self.dropout.p > 0:
            self.dropout(last.detach().masked_fill(replace, 0.0) + quantized.detach().masked_fill(~replace, 0.0))
        out = UniSpeechForPreTrainingOutput(None, last, quantized, perplexity, hidden_states, attentions)
        return out if rd else out.to_tuple()


class UniSpeechSatPreTrainingHead(_PreTrainingHead):
    """transformers' ``UniSpeechSatForPreTraining``: returns ``logits = dropout(extract_features)`` and
    ``projected_states = last_hidden_state``; the quantizer, projections, ``speaker_proj`` and
    ``label_embeddings_concat`` exist for checkpoint compatibility but are unused, and the loss is None."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self._make_backbone(config)
        self.dropout_features = nn.Dropout(config.feat_quantizer_dropout)
        self.quantizer = GumbelVectorQuantizer(config, in_dim=config.hidden_size)
        self.project_q = nn.Linear(config.codevector_dim, config.proj_codevector_dim)
        self.project_hid = nn.Linear(config.hidden_size, config.proj_codevector_dim)
        self.dropout = nn.Dropout(config.final_dropout)
        self.speaker_proj = nn.Linear(config.hidden_size, config.codevector_dim)
        self.label_embeddings_concat = nn.Parameter(torch.zeros(config.num_clusters, config.codevector_dim))
        self.layer_norm_for_extract = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()
        with torch.no_grad():
            self.label_embeddings_concat.zero_()

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> UniSpeechSatForPreTrainingOutput | tuple:
        oa, oh, rd = self._resolve_output_flags(output_attentions, output_hidden_states, return_dict)
        last, extract_features, hidden_states, attentions = self._run_backbone(
            input_values, attention_mask, mask_time_indices, head_mask, oa, oh
        )
        logits = self.dropout_features(extract_features)
        out = UniSpeechSatForPreTrainingOutput(None, logits, last, None, None, hidden_states, attentions)
        return out if rd else out.to_tuple()
