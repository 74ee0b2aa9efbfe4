"""The ten model classes."""

from .unispeech import UniSpeechForCTC, UniSpeechForPreTraining, UniSpeechForSequenceClassification, UniSpeechModel
from .unispeech_sat import (
    UniSpeechSatForAudioFrameClassification,
    UniSpeechSatForCTC,
    UniSpeechSatForPreTraining,
    UniSpeechSatForSequenceClassification,
    UniSpeechSatForXVector,
    UniSpeechSatModel,
)

MODEL_CLASSES = (
    UniSpeechModel,
    UniSpeechForCTC,
    UniSpeechForSequenceClassification,
    UniSpeechForPreTraining,
    UniSpeechSatModel,
    UniSpeechSatForCTC,
    UniSpeechSatForSequenceClassification,
    UniSpeechSatForAudioFrameClassification,
    UniSpeechSatForXVector,
    UniSpeechSatForPreTraining,
)

__all__ = [cls.__name__ for cls in MODEL_CLASSES] + ["MODEL_CLASSES"]
