"""unispeech_fast: UniSpeech and UniSpeech-SAT with custom kernels behind a checked dispatch layer.

Importing the package loads no compiled extension, imports no Triton and does not initialise CUDA.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .configuration import ConfigError, UniSpeechConfig, UniSpeechSatConfig
from . import ops  # noqa: F401  (importing the ops registers their backends with dispatch)
from .dispatch import (
    BackendNotSupportedError,
    VerificationError,
    available_backends,
    backend,
    current_backend,
    verify,
)
from .inference import InferenceOnlyError, optimize_for_inference
from .loading import CheckpointError
from .patching import PatchedModelChangedError, is_patched, patch, unpatch
from .models import (
    MODEL_CLASSES,
    UniSpeechForCTC,
    UniSpeechForPreTraining,
    UniSpeechForSequenceClassification,
    UniSpeechModel,
    UniSpeechSatForAudioFrameClassification,
    UniSpeechSatForCTC,
    UniSpeechSatForPreTraining,
    UniSpeechSatForSequenceClassification,
    UniSpeechSatForXVector,
    UniSpeechSatModel,
)

__all__ = [
    "__version__",
    "UniSpeechConfig",
    "UniSpeechSatConfig",
    "UniSpeechModel",
    "UniSpeechForCTC",
    "UniSpeechForSequenceClassification",
    "UniSpeechForPreTraining",
    "UniSpeechSatModel",
    "UniSpeechSatForCTC",
    "UniSpeechSatForSequenceClassification",
    "UniSpeechSatForAudioFrameClassification",
    "UniSpeechSatForXVector",
    "UniSpeechSatForPreTraining",
    "MODEL_CLASSES",
    "backend",
    "current_backend",
    "verify",
    "available_backends",
    "patch",
    "unpatch",
    "is_patched",
    "PatchedModelChangedError",
    "optimize_for_inference",
    "InferenceOnlyError",
    "BackendNotSupportedError",
    "VerificationError",
    "CheckpointError",
    "ConfigError",
]
