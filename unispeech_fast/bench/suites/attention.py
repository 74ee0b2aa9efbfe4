"""Benchmark suite of the ``attention`` op: our backends, SDPA per backend and ``torch.compile`` of the reference."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import flops as F
from ..harness import Case, Suite
from ..providers import backend_providers, compile_provider, sdpa_providers
from ._common import _elt, _randn, op_suite


def attention(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ...ops import attention as attention_fn, attention_ref

    if quick:
        grid = [dict(B=1, H=2, N=n, D=16) for n in (16, 33)]
    elif device.type == "cpu":  # base at batch 1, the encoder lengths of 2.5 s to 30 s of audio (50 frames/s)
        grid = [dict(B=1, H=12, N=n, D=64) for n in (128, 256, 512, 1024, 1536)]
    else:  # base (12 heads) across lengths, plus 10 minutes of audio (30000 frames) at batch 1
        grid = [dict(B=8, H=12, N=n, D=64) for n in (128, 256, 512, 750, 1024, 2048, 4096)]
        grid += [dict(B=1, H=12, N=30000, D=64), dict(B=8, H=16, N=750, D=64)]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        q, k, v = (_randn(case, p["B"], p["N"], p["H"], p["D"], grad=True) for _ in range(3))
        return dict(q=q, k=k, v=v, scale=p["D"] ** -0.5)

    def ref(q, k, v, scale):
        return attention_ref(q, k, v, scale=scale)[0]

    providers = backend_providers("attention", lambda **kw: attention_fn(**kw)[0])
    providers += sdpa_providers()
    providers.append(compile_provider("torch.compile", ref, quick))
    p = lambda c: c.params  # noqa: E731
    return op_suite(
        "attention", device, dtypes, quick, grid, "N", providers, make_inputs,
        flops=lambda c, m: F.attention_flops(p(c)["B"], p(c)["H"], p(c)["N"], p(c)["D"], m),
        bytes=lambda c, m: F.attention_bytes(p(c)["B"], p(c)["H"], p(c)["N"], p(c)["D"], _elt(c), m),
        notes=["attention: no key padding mask (every key valid)"],
    )

