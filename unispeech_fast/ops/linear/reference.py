"""Eager reference of the ``linear`` op (:func:`linear_ref`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_ref"]


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Eager reference: ``F.linear(x, weight, bias)``; ``x`` ``[..., K]``, ``weight`` ``[N, K]``."""
    return F.linear(x, weight, bias)
