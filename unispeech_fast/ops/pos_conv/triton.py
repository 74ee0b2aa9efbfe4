"""The ``triton`` backend of ``pos_conv``: weight folding, launchers for ``unispeech_fast.kernels.pos_conv``,
the custom ops ``unispeech_fast::triton_pos_conv_fwd`` / ``_bwd`` with fakes and autograd, and the
dispatch entry."""

from __future__ import annotations

import torch

from .._triton_common import cdiv, device_guard, fp32_dot_precision

# Weight folding. ``W = torch._weight_norm(v, g, 2)`` is packed per group into the GEMM layout the
# kernels read, ``Wp[g, k * C + ci, co] = W[g * C + co, ci, k]`` (``[groups, K * C, C]``), with torch ops
# on every call: under autograd torch's own weight-norm backward (and the permute's) carries the packed
# weight's gradient to ``weight_g`` and ``weight_v``, and without grad nothing is kept between calls, so
# the packed weight can never disagree with g and v however they were changed (``.data`` writes, which
# bypass the version counter, included). Folding costs one pass over v, small next to the conv itself.
#: What the kernels run (``kernels/pos_conv.py``).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dims 1 and 2 (batch; groups x channel blocks)


def _fold_weight(weight_g: torch.Tensor, weight_v: torch.Tensor, groups: int) -> torch.Tensor:
    """``torch._weight_norm(v, g, 2)`` packed to ``[groups, K * C, C]`` (differentiable torch ops)."""
    weight = torch._weight_norm(weight_v, weight_g, 2)
    hidden, channels, kernel = weight.shape
    return weight.view(groups, channels, channels, kernel).permute(0, 3, 2, 1).reshape(groups, kernel * channels, channels)


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu"  # dispatch admits CPU tensors for triton only under TRITON_INTERPRET


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    # fp32 follows the one policy of the Triton kernels (torch.get_float32_matmul_precision; README).
    return fp32_dot_precision(device) if dtype == torch.float32 else "ieee"


def _configs(dtype: torch.dtype, device: torch.device) -> dict[str, tuple[int, ...]]:
    from ...kernels import pos_conv as kernels

    return kernels.INTERPRETER_CONFIGS if _interpreting(device) else kernels.GPU_CONFIGS[_DTYPE_NAMES[dtype]]


def _launch_conv(inp, packed, bias, res, out, pre, offset, gelu, save_pre, device):
    """One implicit-GEMM conv launch (forward, or the input gradient with the flipped weight)."""
    from ...kernels import pos_conv as kernels

    batch, frames, _ = inp.shape
    groups, red, channels = packed.shape
    block_t, block_co, block_r, warps, stages = _configs(inp.dtype, device)["conv"]
    grid = (cdiv(frames, block_t), groups * cdiv(channels, block_co), batch)
    kernels._conv_kernel[grid](
        inp, packed, bias if bias is not None else inp, res, out, pre,
        frames, channels, red, offset,
        *inp.stride(), *packed.stride(), *res.stride(), *out.stride(),
        HAS_BIAS=bias is not None, GELU=gelu, SAVE_PRE=save_pre,
        DOT_PRECISION=_dot_precision(inp.dtype, device),
        BLOCK_T=block_t, BLOCK_CO=block_co, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
    )


def _forward(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, save_pre: bool):
    batch, frames, hidden = x.shape
    out = torch.empty((batch, frames, hidden), dtype=x.dtype, device=x.device)
    pre = torch.empty((batch, frames, hidden) if save_pre else (0,), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out, pre
    kernel = packed.shape[1] // packed.shape[2]
    dummy = pre if save_pre else torch.empty(1, dtype=torch.float32, device=x.device)
    _launch_conv(x, packed, bias, x, out, dummy, -(kernel // 2), True, save_pre, x.device)
    return out, pre


def _grad_weight(x: torch.Tensor, grad_pre: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``grad_Wp`` in fp32: per-split partial sums over (batch, time), added in a fixed order.

    A deterministic two-stage reduction rather than fp32 atomics: the gradient is bitwise reproducible
    run to run, and the partial buffer stays small because (reduction blocks x groups) already gives
    thousands of programs at the real sizes, so few time splits are needed to fill the GPU.
    """
    from ...kernels import pos_conv as kernels

    batch, frames, _ = x.shape
    groups, red, channels = packed.shape
    kernel = red // channels
    block_r, block_co, block_t, warps, stages = _configs(x.dtype, x.device)["grad_weight"]
    n_t_tiles = cdiv(frames, block_t)
    total = batch * n_t_tiles
    base = cdiv(red, block_r) * groups * cdiv(channels, block_co)
    if _interpreting(x.device):
        splits = min(2, total)  # exercises the two-stage reduction at test sizes
    else:
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = max(1, min(total, cdiv(target, base), 64))
    tiles_per_split = cdiv(total, splits)
    splits = cdiv(total, tiles_per_split)
    partial = torch.empty((splits, groups, red, channels), dtype=torch.float32, device=x.device)
    grid = (cdiv(red, block_r), groups * cdiv(channels, block_co), splits)
    kernels._grad_weight_kernel[grid](
        x, grad_pre, partial,
        batch, frames, channels, red, -(kernel // 2), n_t_tiles, tiles_per_split,
        *x.stride(), *grad_pre.stride(), *partial.stride(),
        DOT_PRECISION=_dot_precision(x.dtype, x.device),
        BLOCK_R=block_r, BLOCK_CO=block_co, BLOCK_T=block_t, num_warps=warps, num_stages=stages,
    )
    return partial.sum(0)


def _backward(grad_out, x, packed, pre, has_bias: bool, weight_grad: bool):
    from ...kernels import pos_conv as kernels

    batch, frames, hidden = x.shape
    groups, red, channels = packed.shape
    kernel = red // channels
    empty = x.new_empty(0)
    if x.numel() == 0:
        grad_w = torch.zeros_like(packed) if weight_grad else packed.new_empty(0)
        grad_b = x.new_zeros(hidden) if (has_bias and weight_grad) else empty
        return grad_out.to(dtype=x.dtype, memory_format=torch.contiguous_format, copy=True), grad_w, grad_b
    grad_out = grad_out.to(x.dtype).contiguous()
    grad_pre = torch.empty_like(grad_out)
    block, warps = _configs(x.dtype, x.device)["gelu_grad"]
    numel = grad_out.numel()
    kernels._gelu_grad_kernel[(cdiv(numel, block),)](grad_out, pre, grad_pre, numel, BLOCK=block, num_warps=warps)

    # grad_x = grad_out + conv of grad_pre with W transposed (ci <-> co) and its taps flipped
    flipped = packed.view(groups, kernel, channels, channels).flip(1).transpose(2, 3).reshape(groups, red, channels)
    grad_x = torch.empty_like(grad_out)
    _launch_conv(grad_pre, flipped.contiguous(), None, grad_out, grad_x, pre, kernel // 2 - (kernel - 1),
                 False, False, x.device)
    if not weight_grad:
        return grad_x, packed.new_empty(0), empty
    grad_w = _grad_weight(x, grad_pre, packed).to(packed.dtype)
    grad_b = grad_pre.sum(dim=(0, 1), dtype=torch.float32).to(x.dtype) if has_bias else empty
    return grad_x, grad_w, grad_b


@torch.library.custom_op("unispeech_fast::triton_pos_conv_fwd", mutates_args=())
def _triton_pos_conv_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, save_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + gelu(conv(x) + bias), pre)`` with the packed weight ``[groups, K * C, C]``; ``pre`` is the
    fp32 pre-activation ``[B, T, H]`` when ``save_pre`` (needed by the backward), else empty."""
    with device_guard(x.device):
        return _forward(x, weight, bias, save_pre)


@_triton_pos_conv_fwd.register_fake
def _(x, weight, bias, save_pre):
    pre_shape = x.shape if save_pre else (0,)
    return x.new_empty(x.shape), x.new_empty(pre_shape, dtype=torch.float32)


@torch.library.custom_op("unispeech_fast::triton_pos_conv_bwd", mutates_args=())
def _triton_pos_conv_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, has_bias: bool, weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of the forward op; the last two are empty unless
    ``weight_grad`` (and ``grad_bias`` also without a bias)."""
    with device_guard(x.device):
        return _backward(grad_out, x, weight, pre, has_bias, weight_grad)


@_triton_pos_conv_bwd.register_fake
def _(grad_out, x, weight, pre, has_bias, weight_grad):
    grad_w = weight.new_empty(weight.shape if weight_grad else (0,))
    grad_b = x.new_empty((x.shape[2],) if (has_bias and weight_grad) else (0,))
    return x.new_empty(x.shape), grad_w, grad_b


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, save_pre = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias = bias is not None
    ctx.saved_pre = save_pre


def _fwd_backward(ctx, grad_out, _grad_pre):
    if not ctx.saved_pre:
        raise RuntimeError("triton_pos_conv_fwd was called with save_pre=False, so it cannot be differentiated; "
                           "pass save_pre=True when gradients are needed")
    x, weight, pre = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_w, grad_b = torch.ops.unispeech_fast.triton_pos_conv_bwd(grad_out, x, weight, pre, ctx.has_bias, weight_grad)
    return (grad_x, grad_w if weight_grad else None, grad_b if (ctx.has_bias and weight_grad) else None, None)


_triton_pos_conv_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _triton_not_supported(x, weight_g, weight_v, bias, groups, activation="gelu"):
    reasons = []
    if activation != "gelu":
        reasons.append(f"the triton kernel fuses only activation 'gelu' (exact erf), got {activation!r}")
    if x.dim() != 3 or weight_v.dim() != 3:
        reasons.append(f"x must be [batch, frames, hidden] and weight_v [hidden, hidden // groups, kernel], "
                       f"got x {tuple(x.shape)} and weight_v {tuple(weight_v.shape)}")
        return reasons
    hidden, kernel = x.shape[2], weight_v.shape[2]
    if not isinstance(groups, int) or groups < 1 or hidden % groups:
        reasons.append(f"groups must be a positive divisor of hidden size {hidden}, got {groups!r}")
    elif tuple(weight_v.shape) != (hidden, hidden // groups, kernel):
        reasons.append(f"weight_v must have shape {(hidden, hidden // groups, kernel)}, got {tuple(weight_v.shape)}")
    if weight_g.numel() != kernel:
        reasons.append(f"weight_g must have shape (1, 1, {kernel}), got {tuple(weight_g.shape)}")
    if bias is not None and tuple(bias.shape) != (hidden,):
        reasons.append(f"bias must have shape ({hidden},), got {tuple(bias.shape)}")
    for name, t in (("weight_g", weight_g), ("weight_v", weight_v), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            reasons.append(f"{name} dtype {t.dtype} must match x dtype {x.dtype}")
        if t.device != x.device:
            reasons.append(f"{name} is on {t.device}, x on {x.device}")
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        reasons.append("bfloat16 is computed wrongly by the Triton interpreter (CPU); use a GPU or another dtype")
    if x.shape[0] > _MAX_GRID_YZ:
        reasons.append(f"batch {x.shape[0]} exceeds the kernel grid limit {_MAX_GRID_YZ}")
    return reasons


def _pos_conv_triton(x, weight_g, weight_v, bias, groups, activation="gelu"):
    """Triton backend: weight norm folded (on every call), then one fused kernel."""
    packed = _fold_weight(weight_g, weight_v, groups).contiguous()
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or packed.requires_grad or (bias is not None and bias.requires_grad)
    )
    out, _ = torch.ops.unispeech_fast.triton_pos_conv_fwd(x, packed, bias, needs_grad)
    return out
