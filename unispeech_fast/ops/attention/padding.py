"""Key-padding helpers shared by the kernel backends of ``attention`` (triton, cuda, cpp): the valid
lengths of a right-padded mask and the padding checks, computed once per encoder forward
(:func:`padding_checked_once`)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

__all__ = ["has_empty_rows", "mask_lengths", "padding_checked_once", "padding_mask_reasons", "right_padded_lengths"]


_padding_scope: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("unispeech_fast_padding", default=None)


@contextlib.contextmanager
def padding_checked_once(key_padding_mask: torch.Tensor | None) -> Iterator[None]:
    """The scope of one encoder forward: attention calls inside it that get this same mask tensor
    (unmodified: same version counter) share one computation of its lengths and of the kernels' padding
    checks (:func:`padding_mask_reasons`, two host syncs), instead of repeating them in every layer.
    Computed lazily on first use, dropped when the scope ends; no effect while torch.compile traces. An
    inference tensor (made under ``torch.inference_mode``) has no version counter: it is keyed by identity."""
    if key_padding_mask is None or torch.compiler.is_compiling():
        yield
        return
    token = _padding_scope.set((key_padding_mask, _version_of(key_padding_mask), {}))
    try:
        yield
    finally:
        _padding_scope.reset(token)


def _version_of(t: torch.Tensor) -> int | None:
    """``t._version``, or None for an inference tensor, which has no version counter (reading it raises)."""
    return None if t.is_inference() else t._version


def _scope_memo(key_padding_mask: torch.Tensor) -> dict | None:
    if torch.compiler.is_compiling():
        return None
    scope = _padding_scope.get()
    if scope is None or scope[0] is not key_padding_mask or scope[1] != _version_of(key_padding_mask):
        return None
    return scope[2]


def mask_lengths(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """int32 ``[batch]`` row sums of ``key_padding_mask`` (the valid lengths of a right-padded mask), once
    per :func:`padding_checked_once` scope."""
    memo = _scope_memo(key_padding_mask)
    if memo is not None and "lengths" in memo:
        return memo["lengths"]
    lengths = key_padding_mask.sum(dim=-1, dtype=torch.int32)
    if memo is not None:
        memo["lengths"] = lengths
    return lengths


def right_padded_lengths(key_padding_mask: torch.Tensor) -> torch.Tensor | None:
    """int32 ``[batch]`` valid lengths when ``key_padding_mask`` (bool ``[batch, frames]``, True = valid)
    is right-padded in every row (a run of True, then False), else None. One host sync."""
    lengths = mask_lengths(key_padding_mask)
    positions = torch.arange(key_padding_mask.shape[-1], device=key_padding_mask.device)
    if not torch.equal(positions[None, :] < lengths[:, None], key_padding_mask):
        return None
    return lengths


def padding_mask_reasons(key_padding_mask: torch.Tensor) -> list[str]:
    """Why the kernel backends (triton, cuda) refuse ``key_padding_mask`` (bool ``[batch, frames]``): it
    must be right-padded, and every row needs a valid key. A row without one is refused by every kernel
    backend alike, so auto gives it to eager; the kernels themselves (reached without this check under
    torch.compile) give it the reference's uniform attention over all keys. Host syncs, once per
    :func:`padding_checked_once` scope."""
    memo = _scope_memo(key_padding_mask)
    if memo is not None and "reasons" in memo:
        return list(memo["reasons"])
    lengths = right_padded_lengths(key_padding_mask)
    if lengths is None:
        reasons = ["key_padding_mask must be right-padded (a valid prefix, then padding) in every row"]
    elif bool((lengths == 0).any()):
        reasons = ["key_padding_mask has a batch row with no valid frame"]
    else:
        reasons = []
    if memo is not None:
        memo["reasons"] = list(reasons)
    return reasons


def has_empty_rows(key_padding_mask: torch.Tensor) -> bool:
    """Whether some batch row of ``key_padding_mask`` (bool ``[batch, frames]``, True = valid) has no valid
    key (the eager backend then applies the reference's rule for such rows). One host sync, once per
    :func:`padding_checked_once` scope; True while torch.compile traces (the rule is then always applied,
    which leaves rows with a valid key unchanged), so no data-dependent branch enters a graph."""
    if torch.compiler.is_compiling():
        return True
    memo = _scope_memo(key_padding_mask)
    if memo is not None and "empty" in memo:
        return memo["empty"]
    empty = key_padding_mask.shape[-1] == 0 or bool((~key_padding_mask.any(dim=-1)).any())
    if memo is not None:
        memo["empty"] = empty
    return empty
