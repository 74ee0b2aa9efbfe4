"""The ``cpp`` (CPU) and ``cuda`` backends of ``pos_conv``: ``torch.ops.unispeech_fast.pos_conv_fwd`` /
``pos_conv_bwd`` (``csrc/{cpu,cuda}/pos_conv.*``, schemas in ``csrc/schemas.cpp``), their fakes and autograd
formula (registered when the extension loads, :func:`unispeech_fast.ops._extension_ops.on_load`), and the
dispatch entries. Importing this module loads nothing."""

from __future__ import annotations

import torch

from .._extension_ops import _ops, on_load

__all__ = ["CUDA_DTYPES", "pos_conv_ext"]

#: What the CUDA kernel runs (csrc/cuda/pos_conv.cu).
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_POS_CONV_MAX_CHANNELS = 64  # channels per group the CUDA pos_conv kernel accepts (csrc/cuda/pos_conv.cu)


@on_load("pos_conv_fwd", "pos_conv_bwd")
def _register() -> None:
    @torch.library.register_fake("unispeech_fast::pos_conv_fwd")
    def _(x, weight, bias, groups, save_preact):
        torch._check(x.dim() == 3, lambda: f"pos_conv_fwd: x must be [B, T, H], got {tuple(x.shape)}")
        preact = torch.empty_like(x) if save_preact else x.new_empty((0,))
        return torch.empty_like(x), preact

    @torch.library.register_fake("unispeech_fast::pos_conv_bwd")
    def _(grad_out, x, weight, preact, groups, bias_grad):
        grad_b = x.new_empty((x.shape[2],)) if bias_grad else x.new_empty((0,))
        return torch.empty_like(x), torch.empty_like(weight), grad_b

    torch.library.register_autograd("unispeech_fast::pos_conv_fwd", _pos_conv_backward, setup_context=_pos_conv_setup)


def _pos_conv_setup(ctx, inputs, output):
    x, weight, bias, groups, save_preact = inputs
    ctx.groups, ctx.save_preact, ctx.has_bias = groups, save_preact, bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _pos_conv_backward(ctx, grad_out, _grad_preact):
    """VJP of ``out = x + gelu(conv(x) + b)``: see csrc/cpu/pos_conv.cpp for the formulas."""
    x, weight, preact = ctx.saved_tensors
    if not ctx.save_preact:
        raise RuntimeError("pos_conv_fwd was called with save_preact=False, so it cannot be differentiated; "
                           "pass save_preact=True when gradients are needed")
    bias_grad = ctx.has_bias and ctx.needs_input_grad[2]
    grad_x, grad_w, grad_b = torch.ops.unispeech_fast.pos_conv_bwd(
        grad_out.contiguous(), x, weight, preact, ctx.groups, bias_grad
    )
    return grad_x, grad_w, (grad_b if bias_grad else None), None, None


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _pos_conv_shape_reasons(x, weight_g, weight_v, bias, groups, activation) -> list[str]:
    reasons = []
    if activation != "gelu":
        reasons.append(f"only activation 'gelu' is fused, got {activation!r}")
    if x.dim() != 3 or weight_v.dim() != 3:
        reasons.append(f"x must be [B, T, H] and weight_v [H, H/groups, K], got {tuple(x.shape)}, {tuple(weight_v.shape)}")
        return reasons
    hidden = x.shape[2]
    if groups <= 0 or hidden % groups or tuple(weight_v.shape[:2]) != (hidden, hidden // max(groups, 1)):
        reasons.append(f"weight_v must be [{hidden}, {hidden}/groups, K] with groups dividing {hidden}, got "
                       f"{tuple(weight_v.shape)} and groups={groups}")
    if tuple(weight_g.shape) != (1, 1, weight_v.shape[2]):
        reasons.append(f"weight_g must be [1, 1, K] (weight norm over dim 2), got {tuple(weight_g.shape)}")
    if bias is not None and tuple(bias.shape) != (hidden,):
        reasons.append(f"bias must be [{hidden}], got {tuple(bias.shape)}")
    dtypes = {t.dtype for t in (x, weight_g, weight_v, bias) if t is not None}
    if len(dtypes) > 1:
        reasons.append(f"x, weight_g, weight_v and bias must share a dtype, got {sorted(map(str, dtypes))}")
    return reasons


def _pos_conv_cpp_reasons(x, weight_g, weight_v, bias, groups, activation="gelu") -> list[str]:
    """The C++ kernel's call-specific limits (its devices, dtypes and kernel: the package's capabilities)."""
    return _pos_conv_shape_reasons(x, weight_g, weight_v, bias, groups, activation)


def _pos_conv_cuda_reasons(x, weight_g, weight_v, bias, groups, activation="gelu") -> list[str]:
    reasons = _pos_conv_shape_reasons(x, weight_g, weight_v, bias, groups, activation)
    if x.dim() == 3 and groups > 0 and x.shape[2] // groups > _CUDA_POS_CONV_MAX_CHANNELS:
        reasons.append(f"the CUDA pos_conv supports at most {_CUDA_POS_CONV_MAX_CHANNELS} channels per group, "
                       f"got {x.shape[2] // groups}")
    return reasons


def pos_conv_ext(x, weight_g, weight_v, bias, groups, activation="gelu"):
    """``x + gelu(conv(x))`` on ``torch.ops.unispeech_fast.pos_conv_fwd`` (CPU or CUDA kernel).

    The weight norm ``W = g v / ||v||`` is folded with ``torch._weight_norm`` under autograd, so the
    gradients of ``weight_g``/``weight_v`` flow through torch from the kernel's ``grad_weight``.
    """
    ops = _ops()
    weight = torch._weight_norm(weight_v, weight_g, 2).contiguous()
    save = _needs_grad(x, weight_g, weight_v, bias)
    out, _ = ops.pos_conv_fwd(x.contiguous(), weight, bias, groups, save)
    return out

