"""Eager reference of the ``gumbel_quantizer`` op (:func:`gumbel_quantizer_ref`) and the perplexity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gumbel_quantizer_ref"]


def _perplexity(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``probs`` ``[N, G, V]``; ``mask`` bool ``[N]`` or None (mean over every row)."""
    if mask is None:
        marginal = probs.mean(dim=0)
    else:
        marginal = torch.where(mask[:, None, None], probs, torch.zeros_like(probs)).sum(dim=0) / mask.sum()
    return torch.exp(-torch.sum(torch.xlogy(marginal, marginal), dim=-1)).sum()


def gumbel_quantizer_ref(
    logits: torch.Tensor,
    codevectors: torch.Tensor,
    num_groups: int,
    temperature: float,
    sample: bool,
    gumbels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    return_indices: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Eager reference (transformers' ``GumbelVectorQuantizer.forward`` after ``weight_proj``).

    Args:
        logits: ``[batch, frames, num_groups * V]``.
        codevectors: ``[1, num_groups * V, D / num_groups]``.
        sample: True for the training path (Gumbel sampling, torch RNG), False for argmax.
        gumbels: optional explicit Gumbel noise, shape of ``logits`` (training path only: the tests'
            fixed noise, and the pre-training heads' per-sample noise, README "Training").
            With it the call computes exactly what ``F.gumbel_softmax(hard=True)`` computes when it
            draws that noise, in fp32 (fp64 for fp64 logits, so tests get a high-precision reference).
        mask: optional bool ``[batch, frames]``: the perplexity's marginal is the mean over the frames
            where it is True (forward and gradient); None means every frame.
        return_indices: also return the chosen code per group, int64 ``[batch, frames, num_groups]``.

    Returns:
        ``(quantized [batch, frames, D], perplexity scalar)``, plus the indices if ``return_indices``.
    """
    batch, frames, gv = logits.shape
    codes, dg = gv // num_groups, codevectors.shape[-1]  # explicit sizes: no -1 (ambiguous with no frame)
    flat = logits.reshape(batch * frames * num_groups, codes)
    row_mask = None if mask is None else mask.reshape(batch * frames).to(device=logits.device, dtype=torch.bool)
    if gumbels is not None and not sample:
        raise ValueError("gumbels (explicit Gumbel noise) is only used with sample=True")
    if sample and gumbels is not None:
        if gumbels.shape != logits.shape:
            raise ValueError(f"gumbels must have the shape of logits {tuple(logits.shape)}, got {tuple(gumbels.shape)}")
        work = flat.to(torch.promote_types(flat.dtype, torch.float32))
        # F.gumbel_softmax(hard=True), step by step, with the given noise instead of a fresh draw.
        y_soft = ((work + gumbels.reshape(flat.shape).to(work.dtype)) / temperature).softmax(-1)
        index = y_soft.max(-1, keepdim=True)[1]
        y_hard = torch.zeros_like(work, memory_format=torch.legacy_contiguous_format).scatter_(-1, index, 1.0)
        probs = (y_hard - y_soft.detach() + y_soft).type_as(flat)
        perplexity = _perplexity(torch.softmax(work.view(batch * frames, num_groups, codes), dim=-1), row_mask)
    elif sample:
        probs = F.gumbel_softmax(flat.float(), tau=temperature, hard=True).type_as(flat)
        soft = torch.softmax(flat.view(batch * frames, num_groups, codes).float(), dim=-1)
        perplexity = _perplexity(soft, row_mask)
    else:
        idx = flat.argmax(dim=-1)
        probs = flat.new_zeros(*flat.shape).scatter_(-1, idx.view(-1, 1), 1.0)
        perplexity = _perplexity(probs.view(batch * frames, num_groups, codes), row_mask)
    probs = probs.view(batch * frames, gv)
    per_group = probs.unsqueeze(-1) * codevectors
    quantized = per_group.view(batch * frames, num_groups, codes, dg).sum(-2)
    if return_indices:
        # The forward value of the straight-through one-hot is exactly 1 on the chosen code.
        indices = probs.detach().view(batch, frames, num_groups, codes).argmax(-1)
        return quantized.view(batch, frames, num_groups * dg), perplexity, indices
    return quantized.view(batch, frames, num_groups * dg), perplexity
