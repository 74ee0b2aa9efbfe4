"""The tolerance policy shared by the kernel tests: a kernel's max error against an fp64 reference is at most
2x the error of the eager PyTorch computation in the same dtype, plus a floor of ``floor_eps`` units roundoff
of the dtype scaled by the reference's magnitude (``max |ref| + 1``), so values far from 1 do not fail on one
rounding where eager happens to be exact."""

from __future__ import annotations

import torch


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.detach().double() - ref.detach().double()).abs().max().item() if ref.numel() else 0.0


def assert_within_2x_eager(name: str, out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor,
                           floor_eps: float = 2.0) -> None:
    """``out`` (the kernel) and ``eager`` in one dtype against the fp64 ``ref``: finite, same shape, and
    ``err(out) <= 2 err(eager) + floor_eps * eps(dtype) * (max |ref| + 1)``."""
    assert out.shape == ref.shape, (name, tuple(out.shape), tuple(ref.shape))
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    scale = (ref.detach().double().abs().max().item() if ref.numel() else 0.0) + 1.0
    floor = floor_eps * torch.finfo(out.dtype).eps * scale
    err, eager_err = max_err(out, ref), max_err(eager, ref)
    assert err <= 2 * eager_err + floor, (
        f"{name}: max error {err:.3e} > 2 x eager {eager_err:.3e} + floor {floor:.1e} ({out.dtype})")
