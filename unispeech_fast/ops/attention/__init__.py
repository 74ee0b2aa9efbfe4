"""Bidirectional multi-head attention with a key-padding mask and a per-head mask.

``out[b, t, h] = sum_s m_h * softmax_s(scale * q[b,t,h] . k[b,s,h] + mask[b,s]) v[b,s,h]`` where
``mask`` is 0 for valid keys and -inf-like for padded ones, and ``m_h`` is ``head_mask[h]`` (which
multiplies that head's attention probabilities, so 0 removes the head). Padded *query* rows are not
masked: like transformers, their outputs are defined (they attend to the valid keys) but carry no
meaning. Tensors use the ``[batch, frames, heads, head_dim]`` layout that a fused QKV projection
produces without transposes.
"""

from __future__ import annotations

import torch

from ... import dispatch
from . import extension, triton  # noqa: F401  (register the cpp/cuda and triton backends; load nothing)
from .padding import mask_lengths, padding_checked_once, padding_mask_reasons, right_padded_lengths
from .reference import attention_eager, attention_ref

__all__ = ["attention", "attention_ref", "padding_checked_once"]

dispatch.register("attention", "eager", is_stochastic=lambda dropout_p=0.0, **_: dropout_p > 0.0)(attention_eager)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention on the selected backend; see :func:`attention_ref` for the arguments."""
    return dispatch.call(
        "attention",
        q=q,
        k=k,
        v=v,
        key_padding_mask=key_padding_mask,
        head_mask=head_mask,
        dropout_p=dropout_p,
        scale=scale,
        need_weights=need_weights,
    )
