"""Eager reference of the ``attention`` op (:func:`attention_ref`) and the ``eager`` backend
(:func:`attention_eager`: PyTorch SDPA, transformers' default path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .padding import has_empty_rows

__all__ = ["attention_eager", "attention_ref"]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Explicit-softmax reference (transformers' eager attention, plus the head mask).

    Args:
        q, k, v: ``[batch, frames, heads, head_dim]``.
        key_padding_mask: bool ``[batch, frames]``, True for keys that may be attended to.
        head_mask: ``[heads]``, multiplies each head's attention probabilities.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
        scale: score scale, default ``head_dim ** -0.5``.
        need_weights: also return the probabilities ``[batch, heads, frames, frames]``.
        upcast: compute in fp32 (fp64 inputs stay fp64) and cast the result back.

    Returns:
        ``(out [batch, frames, heads, head_dim], weights or None)``.
    """
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(2, 3)) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if head_mask is not None:
        probs = probs * head_mask.to(probs.dtype).view(1, -1, 1, 1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, vh).transpose(1, 2)
    return out.to(dtype), (probs.to(dtype) if need_weights else None)


def attention_eager(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None, need_weights=False):
    """The eager backend: PyTorch SDPA (transformers' default path), or the explicit reference when
    the probabilities are requested. The head mask scales each head's output, which equals scaling
    its probabilities.

    A batch row with no valid key gets the reference's value, a uniform average over all keys with no
    gradient to its q and k (SDPA's bool mask alone would give zeros): for such a row every key is let
    through and its q is replaced by zeros, so all its scores are 0. Rows with a valid key run exactly as
    without this rule (checked once per encoder forward, :func:`.padding.has_empty_rows`)."""
    if need_weights:
        return attention_ref(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights=True)
    mask = None
    if key_padding_mask is not None:
        if has_empty_rows(key_padding_mask):
            empty = ~key_padding_mask.any(dim=-1)
            q = torch.where(empty[:, None, None, None], torch.zeros((), dtype=q.dtype, device=q.device), q)
            key_padding_mask = key_padding_mask | empty[:, None]
        mask = key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p, scale=scale
    )
    if head_mask is not None:
        out = out * head_mask.to(out.dtype).view(1, -1, 1, 1)
    return out.transpose(1, 2), None
