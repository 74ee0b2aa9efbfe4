"""UniSpeech-SAT model classes (transformers' ``UniSpeechSat*`` names and state-dict keys)."""

from __future__ import annotations

from ..configuration import UniSpeechSatConfig
from .base import Backbone
from .heads import (
    ForAudioFrameClassification,
    ForCTC,
    ForSequenceClassification,
    ForXVector,
    UniSpeechSatPreTrainingHead,
)

__all__ = [
    "UniSpeechSatModel",
    "UniSpeechSatForCTC",
    "UniSpeechSatForSequenceClassification",
    "UniSpeechSatForAudioFrameClassification",
    "UniSpeechSatForXVector",
    "UniSpeechSatForPreTraining",
]


class UniSpeechSatModel(Backbone):
    """The bare UniSpeech-SAT encoder (always has ``masked_spec_embed``)."""

    config_class = UniSpeechSatConfig
    base_model_prefix = "unispeech_sat"
    _always_masked_spec_embed = True


class _SatHead:
    config_class = UniSpeechSatConfig
    base_model_prefix = "unispeech_sat"
    backbone_cls = UniSpeechSatModel


class UniSpeechSatForCTC(_SatHead, ForCTC):
    """UniSpeech-SAT with a CTC ``lm_head``."""


class UniSpeechSatForSequenceClassification(_SatHead, ForSequenceClassification):
    """UniSpeech-SAT with a mean-pooled utterance classifier."""


class UniSpeechSatForAudioFrameClassification(_SatHead, ForAudioFrameClassification):
    """UniSpeech-SAT with a per-frame classifier (e.g. diarization)."""


class UniSpeechSatForXVector(_SatHead, ForXVector):
    """UniSpeech-SAT with an x-vector (TDNN + statistics pooling) speaker-embedding head."""


class UniSpeechSatForPreTraining(_SatHead, UniSpeechSatPreTrainingHead):
    """UniSpeech-SAT pre-training: transformers' outputs plus masked prediction, utterance-wise contrastive,
    diversity and feature-penalty losses (with ``labels``)."""
