"""Fused ops: public functionals that go through :mod:`unispeech_fast.dispatch`.

Each op module holds the eager reference (``<op>_ref``), registers it as the ``eager`` backend, and
exposes the public function that modules call.
"""

from .attention import attention, attention_ref
from .feature_extractor import feature_extractor, feature_extractor_ref
from .gumbel_quantizer import gumbel_quantizer, gumbel_quantizer_ref
from .pos_conv import pos_conv, pos_conv_ref

__all__ = [
    "attention",
    "attention_ref",
    "feature_extractor",
    "feature_extractor_ref",
    "gumbel_quantizer",
    "gumbel_quantizer_ref",
    "pos_conv",
    "pos_conv_ref",
]
