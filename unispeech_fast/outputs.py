"""Model output dataclasses with transformers' field names and tuple semantics.

Like ``transformers.utils.ModelOutput``: attribute and key access, integer indexing and
:meth:`to_tuple` over the fields that are not None, in declaration order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = [
    "ModelOutput",
    "BaseModelOutput",
    "CausalLMOutput",
    "SequenceClassifierOutput",
    "TokenClassifierOutput",
    "XVectorOutput",
    "UniSpeechForPreTrainingOutput",
    "UniSpeechSatForPreTrainingOutput",
]


@dataclasses.dataclass
class ModelOutput:
    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclasses.dataclass
class BaseModelOutput(ModelOutput):
    """``last_hidden_state [B, T, H]``, ``extract_features [B, T, C]`` (layer-normed conv features
    before the projection), optional ``hidden_states`` and ``attentions`` tuples."""

    last_hidden_state: torch.Tensor | None = None
    extract_features: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class XVectorOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class UniSpeechForPreTrainingOutput(ModelOutput):
    """transformers' fields, then the loss terms (None unless computed; see ``UniSpeechForPreTraining``)."""

    loss: torch.Tensor | None = None
    projected_states: torch.Tensor | None = None
    projected_quantized_states: torch.Tensor | None = None
    codevector_perplexity: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    contrastive_loss: torch.Tensor | None = None
    diversity_loss: torch.Tensor | None = None
    ctc_loss: torch.Tensor | None = None


@dataclasses.dataclass
class UniSpeechSatForPreTrainingOutput(ModelOutput):
    """transformers' fields, then the loss terms and the cluster logits ``[B, T, num_clusters]`` (None
    unless ``labels`` are given; see ``UniSpeechSatForPreTraining``)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    projected_states: torch.Tensor | None = None
    projected_quantized_states: torch.Tensor | None = None
    codevector_perplexity: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    prediction_loss: torch.Tensor | None = None
    utterance_contrastive_loss: torch.Tensor | None = None
    diversity_loss: torch.Tensor | None = None
    feature_penalty: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
