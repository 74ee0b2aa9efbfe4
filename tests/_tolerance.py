"""The one tolerance rule of the op tests (flash-attention's): a kernel's max error against an fp64 reference is at
most 2x the error of the eager PyTorch computation in the same dtype, plus a floor for one rounding where eager
happens to be exact. The floor is ``floor * scale``: ``floor`` per dtype (:data:`FLOOR`, unless a test keeps a
stricter one), ``scale`` the reference's magnitude (``max(1, max |ref|)``, so values far from 1 do not fail on
one rounding)."""

from __future__ import annotations

import functools

import torch

__all__ = ["FLOOR", "assert_close_cuda", "assert_within_2x_eager", "max_err"]

#: The floor per dtype, in units of the reference's magnitude.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

_SCALES = {
    "ref": lambda m: max(1.0, m),  # the default
    "ref+1": lambda m: m + 1.0,
    "none": lambda m: 1.0,  # an absolute floor
}


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.detach().double() - ref.detach().double()).abs().max().item() if ref.numel() else 0.0


def assert_within_2x_eager(name: str, out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor,
                           floor: float | None = None, *, floor_eps: float | None = None, scale: str = "ref") -> None:
    """``out`` (the kernel) and ``eager`` in one dtype against the fp64 ``ref``: finite, same shape, and
    ``err(out) <= 2 err(eager) + floor * scale(max |ref|)``.

    ``floor`` defaults to ``FLOOR[out.dtype]``; ``floor_eps`` gives it in units roundoff of ``out.dtype`` instead;
    ``scale`` is ``"ref"`` (``max(1, max |ref|)``), ``"ref+1"`` or ``"none"`` (an absolute floor).
    """
    assert out.shape == ref.shape, (name, tuple(out.shape), tuple(ref.shape))
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if floor is None:
        floor = FLOOR[out.dtype] if floor_eps is None else floor_eps * torch.finfo(out.dtype).eps
    magnitude = ref.detach().double().abs().max().item() if ref.numel() else 0.0
    bound_floor = floor * _SCALES[scale](magnitude)
    err, eager_err = max_err(out, ref), max_err(eager, ref)
    assert err <= 2 * eager_err + bound_floor, (
        f"{name}: max error {err:.3e} > 2 x eager {eager_err:.3e} + floor {bound_floor:.1e} ({out.dtype})")


#: The rule with the floor the CUDA op tests have always used: 2 units roundoff of the dtype times (max |ref| + 1).
assert_close_cuda = functools.partial(assert_within_2x_eager, floor_eps=2.0, scale="ref+1")
