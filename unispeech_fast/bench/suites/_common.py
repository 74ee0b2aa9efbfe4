"""What the suites share: case grids, the CPU note, seeded-shape random inputs, element sizes."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ...audio.resampling import SAMPLE_RATE
from ..harness import Case, Provider, Suite

__all__ = ["SAMPLE_RATE"]


def _elt(case: Case) -> int:
    return torch.empty((), dtype=case.dtype).element_size()


def _cases(op: str, grid: Sequence[dict[str, Any]], dtypes: Sequence[torch.dtype], device: torch.device,
           x_key: str) -> list[Case]:
    return [Case(op, dict(params), dtype, device, x_key) for dtype in dtypes for params in grid]


def _cpu_note(device: torch.device, quick: bool, what: str) -> list[str]:
    if quick:
        return [f"{what}: --quick grid (tiny shapes, timings are not meaningful)"]
    if device.type == "cpu":
        return [f"{what}: CPU grid trimmed to what finishes in minutes (the full grid is for GPUs)"]
    return []


def _randn(case: Case, *shape: int, grad: bool = False, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(*shape, device=case.device, dtype=torch.float32).mul_(scale).to(case.dtype)
    return t.requires_grad_(grad)



def op_suite(op: str, device: torch.device, dtypes: Sequence[torch.dtype], quick: bool, grid: Sequence[dict[str, Any]],
             x_key: str, providers: list[Provider], make_inputs: Callable[[Case], dict[str, Any]], *,
             notes: Sequence[str] = (), **fields: Any) -> Suite:
    """The :class:`Suite` of ``op``: one case per dtype and ``grid`` entry (``x_key`` the swept
    parameter), the grid's note (quick / trimmed CPU grid) before ``notes``; ``fields`` as :class:`Suite`'s."""
    return Suite(op=op, cases=_cases(op, grid, dtypes, device, x_key), providers=providers, make_inputs=make_inputs,
                 notes=_cpu_note(device, quick, op) + list(notes), **fields)
