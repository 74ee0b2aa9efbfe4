"""UniSpeech model classes (transformers' ``UniSpeech*`` names and state-dict keys)."""

from __future__ import annotations

from ..configuration import UniSpeechConfig
from .base import Backbone
from .heads import ForCTC, ForSequenceClassification, UniSpeechPreTrainingHead

__all__ = ["UniSpeechModel", "UniSpeechForCTC", "UniSpeechForSequenceClassification", "UniSpeechForPreTraining"]


class UniSpeechModel(Backbone):
    """The bare UniSpeech encoder. ``masked_spec_embed`` exists only when the config masks
    (``mask_time_prob > 0`` or ``mask_feature_prob > 0``), as in transformers."""

    config_class = UniSpeechConfig
    base_model_prefix = "unispeech"
    _always_masked_spec_embed = False


class _UniSpeechHead:
    config_class = UniSpeechConfig
    base_model_prefix = "unispeech"
    backbone_cls = UniSpeechModel


class UniSpeechForCTC(_UniSpeechHead, ForCTC):
    """UniSpeech with a CTC ``lm_head``."""


class UniSpeechForSequenceClassification(_UniSpeechHead, ForSequenceClassification):
    """UniSpeech with a mean-pooled utterance classifier."""


class UniSpeechForPreTraining(_UniSpeechHead, UniSpeechPreTrainingHead):
    """UniSpeech pre-training: transformers' outputs plus the contrastive, diversity and phone-CTC losses."""
