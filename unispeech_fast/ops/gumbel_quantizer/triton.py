"""The ``triton`` backend of ``gumbel_quantizer``: launchers, custom ops with fakes and autograd, dispatch entry."""

from __future__ import annotations

import torch

from .._triton_common import cdiv, device_guard, fp32_dot_precision
from .common import MAX_CODES  # the kernels' limit, read without importing triton

# Layers: kernels (unispeech_fast.kernels.gumbel_quantizer) -> launchers (_triton_forward /
# _triton_backward: allocate, pick blocks, launch) -> custom ops with autograd (torch.library) ->
# _gumbel_quantizer_triton (the dispatch entry, which draws the Philox seed).

#: What the kernels run (``kernels/gumbel_quantizer.py``).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dot_precision(device: torch.device) -> str:
    """``input_precision`` of the backward's dot ``grad_out @ codevectors^T``: its operands are always fp32 (16-bit
    gradients are upcast, the codebook is read as fp32), so it follows the fp32 policy of every Triton kernel."""
    return fp32_dot_precision(device)


def _row_weights(mask, n, device):
    """fp32 ``[N]`` row weights of the marginal (ones without a mask) and its divisor (``n`` without one)."""
    if mask is None:
        return torch.ones(n, device=device, dtype=torch.float32), n
    weight = mask.reshape(n).to(device=device, dtype=torch.float32)
    return weight, weight.sum()


def _triton_forward(logits, codevectors, num_groups, temperature, sample, seed, gumbels, mask):
    from ...kernels import gumbel_quantizer as kern

    batch, frames, gv = logits.shape
    n, num_codes, dg = batch * frames, gv // num_groups, codevectors.shape[-1]
    cfg = kern.pick_config(num_codes)
    flat = logits.reshape(n, gv)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    book = codevectors.reshape(gv, dg).float().contiguous()  # tiny ([G*V, D/G]); the kernel reads fp32
    out_dtype = torch.promote_types(logits.dtype, codevectors.dtype)
    out = torch.empty(n, num_groups * dg, device=logits.device, dtype=out_dtype)
    index = torch.empty(n, num_groups, device=logits.device, dtype=torch.int32)
    blocks = cdiv(n, cfg.rows_fwd)
    partial = torch.empty(blocks, num_groups, num_codes, device=logits.device, dtype=torch.float32)
    soft = torch.empty((n, num_groups, num_codes) if sample else (0,), device=logits.device, dtype=torch.float32)
    explicit = gumbels is not None
    noise = gumbels.reshape(n, gv).float().contiguous() if explicit else partial  # unread unless explicit
    # Unread unless sampling from Philox; int64 like a real seed so the launch matches its AOT variant.
    seed_t = seed if seed is not None else torch.zeros(1, device=logits.device, dtype=torch.int64)
    weight, count = _row_weights(mask, n, logits.device)
    if n > 0:
        kern._gumbel_fwd_kernel[(blocks, num_groups)](
            flat, noise, seed_t, book, out, soft, index, partial, weight,
            n, num_codes, dg, flat.stride(0), out.stride(0), float(temperature),
            SAMPLE=bool(sample), EXPLICIT_NOISE=explicit, ROWS=cfg.rows_fwd,
            BLOCK_N=cfg.block_n_fwd, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d_fwd,
            num_warps=cfg.num_warps_fwd, num_stages=kern.NUM_STAGES,
        )
    marginal = partial.sum(dim=0) / count  # deterministic reduction of the per-block partials
    ppl_dtype = torch.float32 if sample else logits.dtype  # as the reference
    perplexity = torch.exp(-torch.xlogy(marginal, marginal).sum(-1)).sum().to(ppl_dtype)
    return out.view(batch, frames, num_groups * dg), perplexity, soft, index, marginal


def _perplexity_coefficients(marginal: torch.Tensor, grad_perplexity: torch.Tensor, n) -> torch.Tensor:
    """``c_gv = gP * dP/dm_gv / N`` with ``dP/dm_gv = -exp(H_g) (log m_gv + 1)`` (fp32 ``[G, V]``);
    ``N`` is the number of rows, or of masked rows with a perplexity mask.

    ``log`` is taken of ``max(m, tiny)``: a code with marginal 0 has ``p = 0`` in every row, so its
    coefficient only ever multiplies 0 (the reference's ``xlogy`` backward would give NaN there).
    """
    entropy = -torch.xlogy(marginal, marginal).sum(-1, keepdim=True)
    log_m = torch.log(marginal.clamp_min(torch.finfo(torch.float32).tiny))
    return (grad_perplexity.float() * -torch.exp(entropy) * (log_m + 1.0) / n).contiguous()


def _triton_backward(grad_out, grad_perplexity, logits, codevectors, soft, index, marginal, num_groups,
                     temperature, sample, need_logits, need_codevectors, mask):
    from ...kernels import gumbel_quantizer as kern

    batch, frames, gv = logits.shape
    n, num_codes, dg = batch * frames, gv // num_groups, codevectors.shape[-1]
    if need_logits and not sample:
        raise ValueError("need_logits requires sample=True: in eval the logits get no gradient")
    cfg = kern.pick_config(num_codes)
    gq = grad_out.reshape(n, num_groups * dg)
    if gq.stride(-1) != 1:
        gq = gq.contiguous()
    grad_logits = logits.new_empty(0)
    grad_codevectors = codevectors.new_empty(0)
    if need_logits:
        flat = logits.reshape(n, gv)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        book = codevectors.reshape(gv, dg).float().contiguous()
        weight, count = _row_weights(mask, n, logits.device)
        coef = _perplexity_coefficients(marginal, grad_perplexity, count)
        grad_flat = torch.empty(n, gv, device=logits.device, dtype=logits.dtype)
        if n > 0:
            kern._gumbel_bwd_logits_kernel[(cdiv(n, cfg.block_n_bwd), num_groups)](
                gq, book, soft, flat, coef, weight, grad_flat,
                n, num_codes, dg, gq.stride(0), flat.stride(0), grad_flat.stride(0), float(temperature),
                DOT_PRECISION=_dot_precision(logits.device),
                BLOCK_N=cfg.block_n_bwd, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d_bwd,
                num_warps=cfg.num_warps_bwd, num_stages=kern.NUM_STAGES,
            )
        grad_logits = grad_flat.view(logits.shape)
    if need_codevectors:
        acc = torch.zeros(gv, dg, device=codevectors.device, dtype=torch.float32)
        if n > 0:
            kern._gumbel_bwd_codevectors_kernel[(cdiv(n, kern.SCATTER_BLOCK_N), num_groups)](
                gq, index, acc, n, num_codes, dg, gq.stride(0),
                BLOCK_N=kern.SCATTER_BLOCK_N, BLOCK_D=kern.SCATTER_BLOCK_D,
                num_warps=kern.SCATTER_NUM_WARPS, num_stages=kern.NUM_STAGES,
            )
        grad_codevectors = acc.to(codevectors.dtype).view(codevectors.shape)
    return grad_logits, grad_codevectors


@torch.library.custom_op("unispeech_fast::triton_gumbel_quantizer_fwd", mutates_args=())
def _triton_fwd_op(
    logits: torch.Tensor,
    codevectors: torch.Tensor,
    num_groups: int,
    temperature: float,
    sample: bool,
    seed: torch.Tensor | None,
    gumbels: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(quantized, perplexity, soft [N,G,V] fp32 or empty, index [N,G] int32, marginal [G,V])``;
    ``mask`` (bool ``[batch, frames]`` or None) selects the frames of the marginal."""
    with device_guard(logits.device):
        return _triton_forward(logits, codevectors, num_groups, temperature, sample, seed, gumbels, mask)


@_triton_fwd_op.register_fake
def _(logits, codevectors, num_groups, temperature, sample, seed, gumbels, mask=None):
    batch, frames, gv = logits.shape
    n, num_codes, dg = batch * frames, gv // num_groups, codevectors.shape[-1]
    out = logits.new_empty(batch, frames, num_groups * dg, dtype=torch.promote_types(logits.dtype, codevectors.dtype))
    perplexity = logits.new_empty((), dtype=torch.float32 if sample else logits.dtype)
    soft = logits.new_empty((n, num_groups, num_codes) if sample else (0,), dtype=torch.float32)
    index = logits.new_empty(n, num_groups, dtype=torch.int32)
    marginal = logits.new_empty(num_groups, num_codes, dtype=torch.float32)
    return out, perplexity, soft, index, marginal


@torch.library.custom_op("unispeech_fast::triton_gumbel_quantizer_bwd", mutates_args=())
def _triton_bwd_op(
    grad_out: torch.Tensor,
    grad_perplexity: torch.Tensor,
    logits: torch.Tensor,
    codevectors: torch.Tensor,
    soft: torch.Tensor,
    index: torch.Tensor,
    marginal: torch.Tensor,
    num_groups: int,
    temperature: float,
    sample: bool,
    need_logits: bool,
    need_codevectors: bool,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(grad_logits or empty, grad_codevectors or empty)``; ``need_logits`` needs ``sample``."""
    with device_guard(logits.device):
        return _triton_backward(grad_out, grad_perplexity, logits, codevectors, soft, index, marginal, num_groups,
                                temperature, sample, need_logits, need_codevectors, mask)


@_triton_bwd_op.register_fake
def _(grad_out, grad_perplexity, logits, codevectors, soft, index, marginal, num_groups, temperature, sample,
      need_logits, need_codevectors, mask=None):
    grad_logits = torch.empty_like(logits) if need_logits else logits.new_empty(0)
    grad_codevectors = torch.empty_like(codevectors) if need_codevectors else codevectors.new_empty(0)
    return grad_logits, grad_codevectors


def _triton_setup_context(ctx, inputs, output):
    logits, codevectors, num_groups, temperature, sample, _seed, _gumbels, mask = inputs
    _, _, soft, index, marginal = output
    ctx.mark_non_differentiable(index)
    ctx.save_for_backward(logits, codevectors, soft, index, marginal, mask)
    ctx.num_groups, ctx.temperature, ctx.sample = num_groups, temperature, sample


def _triton_backward_rule(ctx, grad_out, grad_perplexity, _grad_soft, _grad_index, _grad_marginal):
    logits, codevectors, soft, index, marginal, mask = ctx.saved_tensors
    # Eval: the one-hot is a constant, so the logits get no gradient (as in transformers).
    need_logits, need_codevectors = ctx.needs_input_grad[0] and ctx.sample, ctx.needs_input_grad[1]
    if grad_out is None:
        grad_out = torch.zeros(
            *logits.shape[:2], codevectors.shape[-1] * ctx.num_groups, device=logits.device,
            dtype=torch.promote_types(logits.dtype, codevectors.dtype),
        )
    if grad_perplexity is None:
        grad_perplexity = torch.zeros((), device=logits.device, dtype=torch.float32)
    grad_logits, grad_codevectors = _triton_bwd_op(
        grad_out, grad_perplexity, logits, codevectors, soft, index, marginal, ctx.num_groups, ctx.temperature,
        ctx.sample, need_logits, need_codevectors, mask,
    )
    return (grad_logits if need_logits else None, grad_codevectors if need_codevectors else None,
            None, None, None, None, None, None)


_triton_fwd_op.register_autograd(_triton_backward_rule, setup_context=_triton_setup_context)


def _triton_not_supported_reasons(logits, codevectors, num_groups, temperature, sample, gumbels=None, mask=None,
                                  return_indices=False) -> list[str]:
    reasons = []
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        return [f"logits must be a 3-D tensor [batch, frames, G*V], got {getattr(logits, 'shape', type(logits))}"]
    if not isinstance(codevectors, torch.Tensor) or codevectors.dim() != 3:
        return [f"codevectors must be a 3-D tensor [1, G*V, D/G], got {getattr(codevectors, 'shape', type(codevectors))}"]
    if not isinstance(num_groups, int) or num_groups < 1 or logits.shape[-1] % num_groups:
        return [f"num_groups must be a positive divisor of logits.shape[-1]={logits.shape[-1]}, got {num_groups!r}"]
    num_codes = logits.shape[-1] // num_groups
    if codevectors.shape[:2] != (1, logits.shape[-1]):
        reasons.append(f"codevectors must be [1, {logits.shape[-1]}, D/G], got {tuple(codevectors.shape)}")
    if codevectors.dtype not in DTYPES:
        reasons.append(f"codevectors dtype {codevectors.dtype} is not one of float16, bfloat16, float32")
    if codevectors.device != logits.device:
        reasons.append(f"codevectors on {codevectors.device} but logits on {logits.device}")
    if logits.device.type == "cpu" and torch.bfloat16 in (logits.dtype, codevectors.dtype):
        reasons.append("bfloat16 is broken in the Triton interpreter (CPU tensors); use float16/float32 or a GPU")
    if num_codes > MAX_CODES:
        reasons.append(f"V = {num_codes} codes per group exceeds the kernel's maximum {MAX_CODES}")
    if logits.shape[0] * logits.shape[1] * logits.shape[2] >= 2**31:
        reasons.append("frames * G * V must be below 2**31 (32-bit Philox offsets)")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        reasons.append(f"temperature must be a positive number, got {temperature!r}")
    if gumbels is not None:
        if not sample:
            reasons.append("gumbels (explicit noise) is only used with sample=True")
        elif not isinstance(gumbels, torch.Tensor) or gumbels.shape != logits.shape or gumbels.device != logits.device:
            reasons.append(f"gumbels must be a tensor of the shape and device of logits {tuple(logits.shape)}")
    return reasons


def _gumbel_quantizer_triton(
    logits, codevectors, num_groups, temperature, sample, gumbels=None, mask=None, return_indices=False
):
    """Triton backend: fused sample/argmax + codevector gather + marginals; see the kernels' docstring.

    Training draws a Philox seed from torch's default generator of ``logits.device`` (so
    ``torch.manual_seed`` reproduces a run); ``gumbels`` replaces the draw with explicit noise.
    """
    seed = None
    if sample and gumbels is None:
        seed = torch.randint(0, 2**31 - 1, (1,), device=logits.device, dtype=torch.int64)
    quantized, perplexity, _, index, _ = torch.ops.unispeech_fast.triton_gumbel_quantizer_fwd(
        logits, codevectors, int(num_groups), float(temperature), bool(sample), seed, gumbels if sample else None,
        mask,
    )
    if return_indices:
        return quantized, perplexity, index.view(*logits.shape[:2], num_groups).long()
    return quantized, perplexity
