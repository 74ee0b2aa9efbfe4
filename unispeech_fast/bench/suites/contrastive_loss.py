"""Benchmark suite of the ``contrastive_loss`` op: our backends and transformers' loss (as Wav2Vec2ForPreTraining computes it)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..harness import Case, Provider, Suite
from ..providers import backend_providers, leaves_of, needs_transformers
from ._common import _randn, op_suite


def transformers_contrastive_loss(predictions, targets, negative_indices, mask_time_indices, temperature,
                                  code_indices=None):
    """The loss as transformers' ``Wav2Vec2ForPreTraining.forward`` computes it (its own
    ``compute_contrastive_logits``; negatives ``[K, B, T, D]`` gathered over every frame), for comparison."""
    from transformers import Wav2Vec2ForPreTraining

    batch, frames, dim = targets.shape
    negatives = targets.view(-1, dim)[negative_indices.long().view(-1)]
    negatives = negatives.view(batch, frames, -1, dim).permute(2, 0, 1, 3)
    logits = Wav2Vec2ForPreTraining.compute_contrastive_logits(targets[None, :], negatives, predictions, temperature)
    neg_is_pos = (targets == negatives).all(-1)
    if neg_is_pos.any():
        logits[1:][neg_is_pos] = float("-inf")
    logits = logits.transpose(0, 2).reshape(-1, logits.size(0))
    target = ((1 - mask_time_indices.long()) * -100).transpose(0, 1).flatten()
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")


def contrastive_loss(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    """The pre-training InfoNCE loss: our backends against transformers' formulation (the issue's
    target case is B=8 x 15 s (749 frames), K=100, D=256, about half the frames masked)."""
    from ...ops import contrastive_loss as cl_fn
    from ...pretraining import sample_negative_indices

    if quick:
        grid = [dict(B=2, T=t, K=5, D=16) for t in (11, 20)]
    else:
        grid = [dict(B=8, T=749, K=100, D=256)]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        g = torch.Generator().manual_seed(0)
        mask = torch.rand(p["B"], p["T"], generator=g) < 0.5
        mask[:, :2] = True
        negatives = sample_negative_indices(mask, p["K"], generator=g).to(case.device)
        targets = _randn(case, p["B"], p["T"], p["D"], grad=True)
        return dict(predictions=_randn(case, p["B"], p["T"], p["D"], grad=True), targets=targets,
                    negative_indices=negatives, mask_time_indices=mask.to(case.device), temperature=0.1)

    def peer(case: Case, inputs: dict[str, Any]):
        return (lambda: transformers_contrastive_loss(**inputs)), leaves_of(inputs)

    providers = backend_providers("contrastive_loss", cl_fn)
    providers.append(Provider("transformers", peer, needs_transformers, kind="peer"))
    return op_suite(
        "contrastive_loss", device, dtypes, quick, grid, "T", providers, make_inputs,
        notes=["contrastive_loss: transformers = Wav2Vec2ForPreTraining's formulation ([K+1, B, T, D] negatives); "
           "no FLOP/byte formula (gather-bound)"],
    )

