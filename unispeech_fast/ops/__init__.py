"""Fused ops: public functionals that go through :mod:`unispeech_fast.dispatch`.

Each op module holds the eager reference (``<op>_ref``), registers it as the ``eager`` backend, and
exposes the public function that modules call.
"""

from .attention import attention, attention_ref
from .contrastive_loss import contrastive_loss, contrastive_loss_ref
from .feature_extractor import feature_extractor, feature_extractor_ref
from .gumbel_quantizer import gumbel_quantizer, gumbel_quantizer_ref
from .linear import linear, linear_ref
from .pos_conv import pos_conv, pos_conv_ref

# Register the compiled extension's backends (cpp for CPU tensors, cuda for CUDA tensors). Neither
# import loads the extension: that happens on first use, through unispeech_fast._extension.status().
from . import _attention_cpp, _cuda, _extension_ops  # noqa: E402,F401  (isort: skip)

__all__ = [
    "attention",
    "attention_ref",
    "contrastive_loss",
    "contrastive_loss_ref",
    "feature_extractor",
    "feature_extractor_ref",
    "gumbel_quantizer",
    "gumbel_quantizer_ref",
    "linear",
    "linear_ref",
    "pos_conv",
    "pos_conv_ref",
]
