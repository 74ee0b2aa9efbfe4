"""The ``cpp`` (CPU) and ``cuda`` backends of ``gumbel_quantizer``: ``torch.ops.unispeech_fast.gumbel_quantizer_fwd``
/ ``_bwd`` (``csrc/{cpu,cuda}/gumbel_quantizer.*``), their fakes and straight-through autograd formula
(registered when the extension loads), and the dispatch entries. Importing this module loads nothing."""

from __future__ import annotations

import torch

from .._extension_ops import _ops, on_load

__all__ = ["gumbel_quantizer_ext"]


@on_load("gumbel_quantizer_fwd", "gumbel_quantizer_bwd")
def _register() -> None:
    @torch.library.register_fake("unispeech_fast::gumbel_quantizer_fwd")
    def _(logits, codevectors, num_groups, temperature, sample, gumbels, seed, offset, mask=None):
        n, gv = logits.shape
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        quantized = codevectors.new_empty((n, num_groups * codevectors.shape[1]))
        indices = logits.new_empty((n, num_groups), dtype=torch.int64)
        soft = logits.new_empty((n, num_groups, gv // num_groups), dtype=acc) if sample else logits.new_empty((0,))
        return quantized, indices, soft, logits.new_empty((), dtype=acc)

    @torch.library.register_fake("unispeech_fast::gumbel_quantizer_bwd")
    def _(grad_quantized, grad_perplexity, logits, codevectors, indices, soft, num_groups, temperature, sample,
          mask=None):
        return torch.empty_like(logits), torch.empty_like(codevectors)

    torch.library.register_autograd("unispeech_fast::gumbel_quantizer_fwd", _gumbel_backward,
                                    setup_context=_gumbel_setup)


def _gumbel_setup(ctx, inputs, output):
    logits, codevectors, num_groups, temperature, sample, _gumbels, _seed, _offset, *rest = inputs
    _quantized, indices, soft, _perplexity = output
    ctx.num_groups, ctx.temperature, ctx.sample = num_groups, temperature, sample
    ctx.mark_non_differentiable(indices, soft)
    ctx.save_for_backward(logits, codevectors, indices, soft, rest[0] if rest else None)


def _gumbel_backward(ctx, grad_quantized, _grad_indices, _grad_soft, grad_perplexity):
    """Straight-through VJP; see csrc/cpu/gumbel_quantizer.cpp for the formulas."""
    logits, codevectors, indices, soft, mask = ctx.saved_tensors
    if grad_quantized is None:
        grad_quantized = codevectors.new_zeros((logits.shape[0], ctx.num_groups * codevectors.shape[1]))
    if grad_perplexity is None:
        grad_perplexity = logits.new_zeros(())
    grad_logits, grad_cv = torch.ops.unispeech_fast.gumbel_quantizer_bwd(
        grad_quantized.contiguous(), grad_perplexity, logits, codevectors, indices, soft,
        ctx.num_groups, ctx.temperature, ctx.sample, mask,
    )
    return (grad_logits if ctx.sample else None), grad_cv, None, None, None, None, None, None, None


def _gumbel_shape_reasons(logits, codevectors, num_groups, temperature) -> list[str]:
    reasons = []
    if logits.dim() != 3:
        reasons.append(f"logits must be [batch, frames, G*V], got {tuple(logits.shape)}")
        return reasons
    gv = logits.shape[2]
    if num_groups <= 0 or gv % num_groups:
        reasons.append(f"num_groups must divide logits.shape[-1] = {gv}, got {num_groups}")
    if codevectors.dim() != 3 or codevectors.shape[0] != 1 or codevectors.shape[1] != gv:
        reasons.append(f"codevectors must be [1, {gv}, D/G], got {tuple(codevectors.shape)}")
    if codevectors.dtype != logits.dtype:
        reasons.append(f"codevectors must have the dtype of logits ({logits.dtype}), got {codevectors.dtype}")
    if not temperature > 0:
        reasons.append(f"temperature must be positive, got {temperature}")
    return reasons


def _gumbel_cpp_reasons(logits, codevectors, num_groups, temperature, sample, mask=None,
                        return_indices=False, gumbels=None) -> list[str]:
    """The C++ kernel's call-specific limits (its devices, dtypes and kernel: the package's capabilities)."""
    return _gumbel_shape_reasons(logits, codevectors, num_groups, temperature)


def _gumbel_cuda_reasons(logits, codevectors, num_groups, temperature, sample, mask=None,
                         return_indices=False, gumbels=None) -> list[str]:
    reasons = _gumbel_shape_reasons(logits, codevectors, num_groups, temperature)
    # The kernel's limits (csrc/cuda/gumbel_quantizer.cu: kMaxGroups, and V in one block's shared memory).
    if num_groups > 32:
        reasons.append(f"the CUDA gumbel_quantizer supports at most 32 groups, got num_groups={num_groups}")
    if not reasons and logits.shape[-1] // num_groups > 12288:
        reasons.append(f"the CUDA gumbel_quantizer supports at most 12288 codes per group, "
                       f"got {logits.shape[-1] // num_groups}")
    return reasons


def gumbel_quantizer_ext(logits, codevectors, num_groups, temperature, sample, mask=None, return_indices=False,
                         gumbels=None):
    """Gumbel quantizer on ``torch.ops.unispeech_fast.gumbel_quantizer_fwd``.

    In sample mode the noise is drawn here exactly as ``F.gumbel_softmax`` draws it (float32,
    ``-Exp(1).log()`` over the ``[N*G, V]`` logits), so under one ``torch.manual_seed`` the codes equal
    the eager backend's; explicit ``gumbels`` (the shape of ``logits``) are used instead, as float32.
    Eval mode gives the logits no gradient (argmax), as the eager reference.
    Returns ``(quantized [batch, frames, D], perplexity)`` in the eager reference's dtypes, plus the
    codes ``[batch, frames, G]`` (int64) with ``return_indices``; ``mask`` (bool ``[batch, frames]``)
    restricts the perplexity to its frames.
    """
    ops = _ops()
    batch, frames, gv = logits.shape
    flat = logits.reshape(batch * frames, gv)
    if not sample:
        flat = flat.detach()
    dg = codevectors.shape[-1]  # explicit sizes: no -1 (ambiguous with no frame)
    codebook = codevectors.reshape(gv, dg)
    if gumbels is not None:
        gumbels = gumbels.reshape(batch * frames, gv).to(torch.float32).contiguous()
    elif sample:
        noise = torch.empty((batch * frames * num_groups, gv // num_groups), dtype=torch.float32, device=logits.device)
        gumbels = -noise.exponential_().log()
        gumbels = gumbels.view(batch * frames, gv)
    rows = None if mask is None else mask.reshape(batch * frames).contiguous()
    quantized, indices, _, perplexity = ops.gumbel_quantizer_fwd(
        flat.contiguous(), codebook.contiguous(), num_groups, float(temperature), bool(sample), gumbels, 0, 0, rows
    )
    perplexity = perplexity.to(torch.float32 if sample else logits.dtype)
    if return_indices:
        return quantized.view(batch, frames, num_groups * dg), perplexity, indices.view(batch, frames, num_groups)
    return quantized.view(batch, frames, num_groups * dg), perplexity

