"""Fused ops: public functionals that go through :mod:`unispeech_fast.dispatch`.

One package per op, ``unispeech_fast/ops/<op>/``: ``__init__.py`` (the public function and its input
contract; it registers the eager reference as the ``eager`` backend), ``reference.py`` (the eager
reference ``<op>_ref``), ``triton.py`` (the Triton launchers, custom ops and autograd) and ``extension.py``
(the cpp/cuda wrappers, fakes and autograd of the compiled extension's ops). Importing an op registers
all its backends; none of them loads triton or the extension before first use.
"""

from .attention import attention, attention_ref
from .contrastive_loss import contrastive_loss, contrastive_loss_ref
from .feature_extractor import feature_extractor, feature_extractor_ref
from .gumbel_quantizer import gumbel_quantizer, gumbel_quantizer_ref
from .linear import linear, linear_ref
from .pos_conv import pos_conv, pos_conv_ref

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
