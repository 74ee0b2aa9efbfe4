"""The benchmark declarations: per op (and for the whole models) the shape grid, the inputs and the providers.

``benchmarks/bench_<op>.py`` and ``unispeech-fast bench`` both take their suites from here, so pytest
and the CLI measure the same cases. One module per op (``<op>.py``, declaring the function of that name)
plus ``models.py``; this package maps the names to them (:data:`SUITES`) and builds them
(:func:`make_suite`). Grids: ``quick`` (tiny shapes, for tests and smoke runs), the full grid on CUDA,
and a trimmed grid on CPU (the full one would take hours there; each suite says so in its ``notes``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..harness import Suite
from .attention import attention
from .contrastive_loss import contrastive_loss, transformers_contrastive_loss
from .feature_extractor import feature_extractor
from .gumbel_quantizer import gumbel_quantizer
from .linear import linear
from .models import MODEL_CONFIGS, MODEL_FAMILIES, MODEL_GRID, models
from .pos_conv import pos_conv

__all__ = ["SUITES", "OPS", "make_suite", "attention", "pos_conv", "feature_extractor", "gumbel_quantizer",
           "linear", "contrastive_loss", "transformers_contrastive_loss", "models", "MODEL_GRID", "MODEL_CONFIGS"]


SUITES: dict[str, Callable[[torch.device, Sequence[torch.dtype], bool], Suite]] = {
    "feature_extractor": feature_extractor,
    "pos_conv": pos_conv,
    "attention": attention,
    "gumbel_quantizer": gumbel_quantizer,
    "linear": linear,
    "contrastive_loss": contrastive_loss,
    "models": models,
}
OPS = tuple(SUITES)


def make_suite(op: str, device: str | torch.device = "cpu", dtypes: Sequence[str | torch.dtype] = ("float32",),
               quick: bool = False) -> Suite:
    """The suite for ``op`` (one of :data:`OPS`) on ``device`` in ``dtypes``."""
    if op not in SUITES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    dev = torch.device(device)
    resolved = []
    for d in dtypes:
        dt = getattr(torch, d, None) if isinstance(d, str) else d
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"dtypes must name torch floating dtypes (float16, bfloat16, float32), got {d!r}")
        resolved.append(dt)
    suite = SUITES[op](dev, resolved, quick)
    suite.origin = {"op": op, "quick": quick}
    return suite
