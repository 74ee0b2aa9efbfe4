"""Eager reference of the ``contrastive_loss`` op (the wav2vec 2.0 / UniSpeech InfoNCE term).

For every masked frame ``r`` (``M`` of them) with prediction ``c_r``, positive target ``y_r`` and
negatives ``y_{j_rk}`` (``k < K``, rows of the flattened ``[B*T, D]`` targets):

    s_r0 = cos(c_r, y_r) / tau,    s_rk = cos(c_r, y_{j_rk}) / tau,  or -inf where negative k "equals"
    the positive (same code in every group when ``code_indices`` is given, else equal in every
    element, transformers' rule),
    loss = sum_r [ logsumexp_k(s_r) - s_r0 ].

Unlike transformers' formulation (``[K+1, B, T, D]`` over every frame), only the masked rows are
gathered: ``[M, K, D]`` normalised negatives. ``cos(a, b) = a/max(|a|, eps) . b/max(|b|, eps)``
with ``eps = 1e-8`` (``torch.cosine_similarity``). Half inputs compute in fp32 and return fp32.
"""

from __future__ import annotations

import torch

__all__ = ["contrastive_loss_ref", "flat_masked_inputs", "COSINE_EPS"]

#: ``torch.cosine_similarity``'s default eps: norms below it are clamped.
COSINE_EPS = 1e-8



def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for ``x`` ``[N, D]`` and an integer ``index`` of any shape -> ``[*index.shape, D]``,
    with a backward that gives the same gradient on every run.

    Repeated indices sum their gradients. On CPU advanced indexing's backward (index_put with accumulate)
    adds them with atomic float adds in thread order (float32, >= 32768 elements, > 1 thread), so the sum
    changes from run to run; ``index_select``'s backward (index_add) adds in index order there. On CUDA it
    is the other way round (index_add uses atomics; index_put with accumulate sorts), so each device takes
    the one that is deterministic on it. The forward values are identical either way.
    """
    if x.device.type == "cpu":
        return x.index_select(0, index.reshape(-1)).view(*index.shape, x.shape[-1])
    return x[index]

def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def flat_masked_inputs(predictions, targets, negative_indices, mask_time_indices, code_indices=None):
    """The fused kernels' operands: predictions and targets ``[B*T, D]`` contiguous, the masked rows
    ``[M]`` (distinct, int64), their negatives ``[M, K]`` and the codes ``[B*T, G]`` (or None), int64."""
    batch, frames, dim = predictions.shape
    rows = mask_time_indices.reshape(-1).nonzero().squeeze(1)
    negatives = negative_indices.reshape(batch * frames, -1)[rows].long().contiguous()
    codes = None if code_indices is None else code_indices.reshape(batch * frames, -1).long().contiguous()
    return (predictions.reshape(batch * frames, dim).contiguous(), targets.reshape(batch * frames, dim).contiguous(),
            rows, negatives, codes)


def contrastive_loss_ref(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    negative_indices: torch.Tensor,
    mask_time_indices: torch.Tensor,
    temperature: float,
    code_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """The summed InfoNCE loss over masked frames (see the module docstring); a 0-d tensor."""
    batch, frames, dim = predictions.shape
    work = torch.promote_types(predictions.dtype, torch.float32)
    rows = mask_time_indices.reshape(-1).nonzero().squeeze(1)  # [M] masked rows of the flat [B*T] axis
    neg_idx = negative_indices.reshape(batch * frames, -1)[rows]  # [M, K]
    flat_targets = targets.reshape(batch * frames, dim)
    pred = _normalise(predictions.reshape(batch * frames, dim)[rows].to(work))  # [M, D]
    pos = _normalise(flat_targets[rows].to(work))  # [M, D]
    neg = _normalise(gather_rows(flat_targets, neg_idx).to(work))  # [M, K, D]
    logits = torch.cat([(pred * pos).sum(-1, keepdim=True), torch.einsum("md,mkd->mk", pred, neg)], dim=1)
    logits = logits / temperature
    with torch.no_grad():
        if code_indices is not None:
            codes = code_indices.reshape(batch * frames, -1)
            same = (codes[neg_idx] == codes[rows][:, None, :]).all(-1)
        else:
            same = (flat_targets[neg_idx] == flat_targets[rows][:, None, :]).all(-1)
    logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(same, float("-inf"))], dim=1)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).sum()
