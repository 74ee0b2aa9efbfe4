"""The Gumbel-softmax product vector quantizer.

Logits ``[batch, frames, G * V]`` are split into G groups of V codevector logits. In training each
group draws a hard straight-through one-hot ``y = onehot(argmax(l + n)) - s.detach() + s`` with
``s = softmax((l + n) / tau)`` and Gumbel noise n (forward is hard, gradient flows through s); in
eval it is ``onehot(argmax(l))``. The output concatenates, over groups, the selected rows of the
codebook ``[1, G * V, D / G]``. The perplexity is ``sum_g exp(-sum_v p_gv log p_gv)`` with ``p`` the
mean over all frames of ``softmax(l)`` (training) or of the one-hots (eval); padding is not excluded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch

__all__ = ["gumbel_quantizer", "gumbel_quantizer_ref"]


def _perplexity(probs: torch.Tensor) -> torch.Tensor:
    marginal = probs.mean(dim=0)
    return torch.exp(-torch.sum(torch.xlogy(marginal, marginal), dim=-1)).sum()


def gumbel_quantizer_ref(
    logits: torch.Tensor,
    codevectors: torch.Tensor,
    num_groups: int,
    temperature: float,
    sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference (transformers' ``GumbelVectorQuantizer.forward`` after ``weight_proj``).

    Args:
        logits: ``[batch, frames, num_groups * V]``.
        codevectors: ``[1, num_groups * V, D / num_groups]``.
        sample: True for the training path (Gumbel sampling, torch RNG), False for argmax.

    Returns:
        ``(quantized [batch, frames, D], perplexity scalar)``.
    """
    batch, frames, _ = logits.shape
    flat = logits.reshape(batch * frames * num_groups, -1)
    if sample:
        probs = F.gumbel_softmax(flat.float(), tau=temperature, hard=True).type_as(flat)
        soft = torch.softmax(flat.view(batch * frames, num_groups, -1).float(), dim=-1)
        perplexity = _perplexity(soft)
    else:
        idx = flat.argmax(dim=-1)
        probs = flat.new_zeros(*flat.shape).scatter_(-1, idx.view(-1, 1), 1.0)
        perplexity = _perplexity(probs.view(batch * frames, num_groups, -1))
    probs = probs.view(batch * frames, -1)
    per_group = probs.unsqueeze(-1) * codevectors
    quantized = per_group.view(batch * frames, num_groups, probs.shape[-1] // num_groups, -1).sum(-2)
    return quantized.view(batch, frames, -1), perplexity


dispatch.register("gumbel_quantizer", "eager", is_stochastic=lambda sample=False, **_: bool(sample))(
    gumbel_quantizer_ref
)


def gumbel_quantizer(
    logits: torch.Tensor,
    codevectors: torch.Tensor,
    num_groups: int,
    temperature: float,
    sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel vector quantizer on the selected backend; see :func:`gumbel_quantizer_ref`."""
    return dispatch.call(
        "gumbel_quantizer",
        logits=logits,
        codevectors=codevectors,
        num_groups=num_groups,
        temperature=temperature,
        sample=sample,
    )
