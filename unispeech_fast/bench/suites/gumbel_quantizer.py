"""Benchmark suite of the ``gumbel_quantizer`` op: our backends and ``torch.compile`` of the reference."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import flops as F
from ..harness import Case, Suite
from ..providers import backend_providers, compile_provider
from ._common import _elt, _randn, op_suite


def gumbel_quantizer(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ...ops import gumbel_quantizer as gq_fn, gumbel_quantizer_ref

    if quick:
        grid = [dict(B=1, T=t, G=2, V=5, D=8, sample=True) for t in (7, 20)]
    elif device.type == "cpu":
        grid = [dict(B=1, T=t, G=2, V=320, D=256, sample=s) for s in (True, False) for t in (100, 500)]
    else:
        grid = [dict(B=8, T=t, G=2, V=320, D=256, sample=s) for s in (True, False) for t in (100, 250, 750, 1500)]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        return dict(
            logits=_randn(case, p["B"], p["T"], p["G"] * p["V"], grad=p["sample"]),
            codevectors=_randn(case, 1, p["G"] * p["V"], p["D"] // p["G"], grad=True),
            num_groups=p["G"],
            temperature=2.0,
            sample=p["sample"],
        )

    p = lambda c: c.params  # noqa: E731
    providers = backend_providers("gumbel_quantizer", gq_fn)
    providers.append(compile_provider("torch.compile", gumbel_quantizer_ref, quick))
    return op_suite(
        "gumbel_quantizer", device, dtypes, quick, grid, "T", providers, make_inputs,
        bytes=lambda c, m: F.gumbel_quantizer_bytes(p(c)["B"], p(c)["T"], p(c)["G"], p(c)["V"], p(c)["D"], _elt(c), m),
        notes=["gumbel_quantizer: memory-bound, GB/s only (no FLOP count); sample=False has gradients for the "
           "codebook only"],
    )

