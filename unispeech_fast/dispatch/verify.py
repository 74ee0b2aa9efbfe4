"""Verify mode: run the eager reference beside the chosen backend on every call and compare
(:func:`verify` or ``UNISPEECH_FAST_VERIFY=1``; the variable is read as a boolean, see :func:`verify_enabled`)."""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator

import torch

from .context import _compile_mirror
from .registry import OpImpl

_ENV_VERIFY = "UNISPEECH_FAST_VERIFY"
#: The values of ``$UNISPEECH_FAST_VERIFY`` (any case, surrounding blanks ignored); anything else is an error.
_ENV_OFF = ("", "0", "false", "no", "off")
_ENV_ON = ("1", "true", "yes", "on")

_verify_var: contextvars.ContextVar[dict | None] = contextvars.ContextVar("unispeech_fast_verify", default=None)

# Default verify tolerances (atol, rtol) per dtype, as used when the caller gives none.
VERIFY_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


class VerificationError(AssertionError):
    """Verify mode found a backend output that disagrees with the eager reference."""


def _env_verify() -> bool:
    """``$UNISPEECH_FAST_VERIFY`` as a boolean: unset or one of :data:`_ENV_OFF` is off, one of :data:`_ENV_ON`
    on (any case); any other value raises ``ValueError`` naming the variable and the accepted values."""
    value = os.environ.get(_ENV_VERIFY, "")
    word = value.strip().lower()
    if word in _ENV_OFF:
        return False
    if word in _ENV_ON:
        return True
    raise ValueError(f"${_ENV_VERIFY}: verify must be one of {_ENV_ON} (on) or {_ENV_OFF} (off), in any case, "
                     f"got {value!r}")


def verify_enabled() -> dict | None:
    """The verify settings of this context (``atol``/``rtol``, ``None`` for the per-dtype defaults), or ``None``
    when verify mode is off: :func:`verify` if active, else ``$UNISPEECH_FAST_VERIFY`` (see :func:`_env_verify`)."""
    cfg = _compile_mirror["verify"] if torch.compiler.is_compiling() else _verify_var.get()
    if cfg is not None:
        return cfg
    if _env_verify():
        return {"atol": None, "rtol": None}
    return None


@contextlib.contextmanager
def verify(atol: float | None = None, rtol: float | None = None) -> Iterator[None]:
    """Run the eager reference beside the chosen backend on every op call and compare.

    Raises :class:`VerificationError` naming the op, the backend and the max abs error when
    ``|out - ref| > atol + rtol * |ref|`` anywhere. Tolerances default per dtype
    (:data:`VERIFY_TOLERANCES`). Stochastic calls (dropout, Gumbel sampling) cannot be compared and
    are logged, once per op, as not verified.
    """
    token = _verify_var.set({"atol": atol, "rtol": rtol})
    previous, _compile_mirror["verify"] = _compile_mirror["verify"], {"atol": atol, "rtol": rtol}
    try:
        yield
    finally:
        _verify_var.reset(token)
        _compile_mirror["verify"] = previous


def _flatten(out: Any) -> list[torch.Tensor | None]:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [out] if (out is None or isinstance(out, torch.Tensor)) else []


def _compare(op: str, impl: OpImpl, out: Any, ref: Any, cfg: dict) -> None:
    outs, refs = _flatten(out), _flatten(ref)
    if len(outs) != len(refs):
        raise VerificationError(f"{op} on {impl.backend}: {len(outs)} outputs, reference has {len(refs)}")
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o is None or r is None:
            if (o is None) != (r is None):
                raise VerificationError(f"{op} on {impl.backend}: output {i} is None on one side only")
            continue
        if o.shape != r.shape:
            raise VerificationError(f"{op} on backend {impl.backend!r}: output {i} has shape {tuple(o.shape)}, "
                                    f"the eager reference {tuple(r.shape)}")
        if o.dtype != r.dtype:
            raise VerificationError(f"{op} on backend {impl.backend!r}: output {i} has dtype {o.dtype}, "
                                    f"the eager reference {r.dtype}")
        if o.device != r.device:
            raise VerificationError(f"{op} on backend {impl.backend!r}: output {i} is on {o.device}, "
                                    f"the eager reference on {r.device}")
        o64, r64 = o.detach().double(), r.detach().double()
        # Non-finite values are compared as such: NaN where the reference has none (or none where it
        # has one), and an infinity that differs from the reference's, are reported by count.
        o_nan, r_nan = torch.isnan(o64), torch.isnan(r64)
        o_inf, r_inf = torch.isinf(o64), torch.isinf(r64)
        nan_bad = int((o_nan != r_nan).sum())
        inf_bad = int(((o_inf | r_inf) & ~(o_nan | r_nan) & (o64 != r64)).sum())
        if nan_bad or inf_bad:
            parts = []
            if nan_bad:
                parts.append(f"{int((o_nan & ~r_nan).sum())} NaN where the reference is not NaN, "
                             f"{int((r_nan & ~o_nan).sum())} not NaN where the reference is")
            if inf_bad:
                parts.append(f"{inf_bad} infinite value(s) that differ from the reference")
            raise VerificationError(
                f"{op} on backend {impl.backend!r}: output {i} has non-finite values the eager reference does not "
                f"({'; '.join(parts)}; of {o.numel()} elements)"
            )
        default_atol, default_rtol = VERIFY_TOLERANCES.get(r.dtype, (0.0, 0.0))
        atol = default_atol if cfg["atol"] is None else cfg["atol"]
        rtol = default_rtol if cfg["rtol"] is None else cfg["rtol"]
        finite = torch.isfinite(o64) & torch.isfinite(r64)  # the rest matched exactly above
        err = torch.where(finite, (o64 - r64).abs(), torch.zeros_like(o64))
        bad = err > atol + rtol * torch.where(finite, r64.abs(), torch.zeros_like(r64))
        if bool(bad.any()):
            raise VerificationError(
                f"{op} on backend {impl.backend!r} disagrees with the eager reference: output {i}, "
                f"max abs error {err.max().item():.3e} "
                f"(atol={atol:g}, rtol={rtol:g}, {int(bad.sum())} of {bad.numel()} elements out of tolerance)"
            )


