"""Benchmark suite of the ``linear`` op: our backends and ``torch.compile`` of the reference."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import flops as F
from ..harness import Case, Suite
from ..providers import backend_providers, compile_provider
from ._common import _elt, _randn, op_suite


def linear(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ...ops import linear as linear_fn, linear_ref

    if quick:
        grid = [dict(T=t, K=16, N=24) for t in (7, 20)]
    elif device.type == "cpu":  # the base encoder's layers at 10 s of audio (499 frames)
        grid = [dict(T=499, K=768, N=2304), dict(T=499, K=768, N=3072), dict(T=499, K=3072, N=768)]
    else:  # batch 8 x 15 s of audio (8 x 749 frames), base and large widths
        grid = [dict(T=5992, K=768, N=2304), dict(T=5992, K=768, N=3072), dict(T=5992, K=3072, N=768),
                dict(T=5992, K=1024, N=4096), dict(T=5992, K=4096, N=1024)]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        return dict(x=_randn(case, 1, p["T"], p["K"], grad=True),
                    weight=_randn(case, p["N"], p["K"], grad=True, scale=p["K"] ** -0.5),
                    bias=_randn(case, p["N"], grad=True))

    p = lambda c: c.params  # noqa: E731
    providers = backend_providers("linear", linear_fn)
    providers.append(compile_provider("torch.compile", linear_ref, quick))
    return op_suite(
        "linear", device, dtypes, quick, grid, "T", providers, make_inputs,
        flops=lambda c, m: F.linear_flops(p(c)["T"], p(c)["K"], p(c)["N"], m),
        bytes=lambda c, m: F.linear_bytes(p(c)["T"], p(c)["K"], p(c)["N"], _elt(c), m),
        notes=["linear: the encoder's dense layers; cpp is oneDNN's matmul (inference only: its bwd rows are "
           "skipped)"],
    )

