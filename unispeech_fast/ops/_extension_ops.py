"""Python side of the compiled ops ``torch.ops.unispeech_fast.*`` (schemas in ``csrc/schemas.cpp``).

Three things live here:

* fake (meta) implementations for **every** schema, so the ops trace under
  ``torch.compile(fullgraph=True)``;
* autograd formulas for ``pos_conv_fwd`` (via ``pos_conv_bwd``), ``gumbel_quantizer_fwd`` (via
  ``gumbel_quantizer_bwd``) and ``conv_norm_gelu_fwd`` (by recomputing the eager layer under autograd,
  activation-checkpoint style: the compiled forward has no hand-written backward), and for
  ``attention_fwd`` (:mod:`._attention_cpp`, which recomputes the eager reference). They call
  ``torch.ops.unispeech_fast.*``, which dispatch on the device, so they serve CPU and CUDA tensors alike;
* the dispatch backends ``cpp`` (CPU tensors) for ``feature_extractor``, ``pos_conv`` and
  ``gumbel_quantizer``, and ``cuda`` for ``pos_conv`` and ``gumbel_quantizer`` (same wrappers).
  ``feature_extractor`` and ``attention`` register their ``cuda`` backends in :mod:`._cuda`;
  ``attention`` registers its ``cpp`` backend in :mod:`._attention_cpp`.

Importing this module never loads the extension: fakes and autograd formulas are registered on the
first call that needs the ops (through :func:`unispeech_fast._extension.status`), and where the
extension is missing every backend here reports why it cannot run.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .. import _extension, dispatch

__all__ = [
    "ensure_registered",
    "feature_extractor_ext",
    "gumbel_quantizer_ext",
    "pos_conv_ext",
]

_NS = "unispeech_fast"
_CPP_DTYPES = (torch.float32, torch.float64)
_CUDA_POS_CONV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_POS_CONV_MAX_CHANNELS = 64  # channels per group the CUDA pos_conv kernel accepts (csrc/cuda/pos_conv.cu)
_NORM_KINDS = {"group": 1, "layer": 2}

_registered = False


@_extension.constant_under_compile  # called, not traced, by torch.compile (it loads and registers)
def ensure_registered() -> bool:
    """Load the extension and register the fakes and autograd formulas once; True when loaded."""
    global _registered
    if _registered:
        return True
    if not _extension.status().loaded:
        return False
    _register_fakes()
    _register_autograd()
    _registered = True
    return True


def _ops() -> Any:
    if not ensure_registered():
        raise dispatch.BackendNotSupportedError(f"C++ extension not available: {_extension.summary()[1]}")
    return torch.ops.unispeech_fast


def _has_kernel(op: str, key: str) -> bool:
    return ensure_registered() and torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NS}::{op}", key)


# ---------------------------------------------------------------------------------------------- fakes
def _register_fakes() -> None:
    lib = f"{_NS}::"

    @torch.library.register_fake(lib + "pos_conv_fwd")
    def _(x, weight, bias, groups, save_preact):
        torch._check(x.dim() == 3, lambda: f"pos_conv_fwd: x must be [B, T, H], got {tuple(x.shape)}")
        preact = torch.empty_like(x) if save_preact else x.new_empty((0,))
        return torch.empty_like(x), preact

    @torch.library.register_fake(lib + "pos_conv_bwd")
    def _(grad_out, x, weight, preact, groups, bias_grad):
        grad_b = x.new_empty((x.shape[2],)) if bias_grad else x.new_empty((0,))
        return torch.empty_like(x), torch.empty_like(weight), grad_b

    @torch.library.register_fake(lib + "conv_norm_gelu_fwd")
    def _(x, weight, bias, norm_weight, norm_bias, stride, norm_kind, eps):
        torch._check(x.dim() == 3, lambda: f"conv_norm_gelu_fwd: x must be [B, C_in, T], got {tuple(x.shape)}")
        frames = (x.shape[2] - weight.shape[2]) // stride + 1
        return x.new_empty((x.shape[0], weight.shape[0], frames))

    @torch.library.register_fake(lib + "gumbel_quantizer_fwd")
    def _(logits, codevectors, num_groups, temperature, sample, gumbels, seed, offset, mask=None):
        n, gv = logits.shape
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        quantized = codevectors.new_empty((n, num_groups * codevectors.shape[1]))
        indices = logits.new_empty((n, num_groups), dtype=torch.int64)
        soft = logits.new_empty((n, num_groups, gv // num_groups), dtype=acc) if sample else logits.new_empty((0,))
        return quantized, indices, soft, logits.new_empty((), dtype=acc)

    @torch.library.register_fake(lib + "gumbel_quantizer_bwd")
    def _(grad_quantized, grad_perplexity, logits, codevectors, indices, soft, num_groups, temperature, sample,
          mask=None):
        return torch.empty_like(logits), torch.empty_like(codevectors)

    @torch.library.register_fake(lib + "attention_fwd")
    def _(q, k, v, seqlens, head_mask, scale):
        return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------- autograd
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


def conv_norm_gelu_eager(x, weight, bias, norm_weight, norm_bias, stride: int, norm_kind: int, eps: float):
    """The eager math of ``conv_norm_gelu_fwd`` (used for its backward by recomputation)."""
    h = F.conv1d(x, weight, bias, stride=stride)
    if norm_kind == 1:
        h = F.group_norm(h, h.shape[1], norm_weight, norm_bias, eps)
    elif norm_kind == 2:
        h = F.layer_norm(h.transpose(-2, -1), (h.shape[1],), norm_weight, norm_bias, eps).transpose(-2, -1)
    return F.gelu(h)


def _cng_setup(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, stride, norm_kind, eps = inputs
    ctx.stride, ctx.norm_kind, ctx.eps = stride, norm_kind, eps
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias)


def _cng_backward(ctx, grad_out):
    """No hand-written backward: recompute the layer with eager torch ops under autograd (activation
    checkpointing) and return their gradients."""
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(saved, needs)]
        y = conv_norm_gelu_eager(*leaves, ctx.stride, ctx.norm_kind, ctx.eps)
        wanted = [t for t, n in zip(leaves, needs) if t is not None and n]
        grads = iter(torch.autograd.grad(y, wanted, grad_out) if wanted else ())
    out = [next(grads) if (t is not None and n) else None for t, n in zip(leaves, needs)]
    return (*out, None, None, None)


def _register_autograd() -> None:
    torch.library.register_autograd(f"{_NS}::pos_conv_fwd", _pos_conv_backward, setup_context=_pos_conv_setup)
    torch.library.register_autograd(f"{_NS}::gumbel_quantizer_fwd", _gumbel_backward, setup_context=_gumbel_setup)
    torch.library.register_autograd(f"{_NS}::conv_norm_gelu_fwd", _cng_backward, setup_context=_cng_setup)
    from . import _attention_cpp  # attention_fwd's backward recomputes the reference (see that module)

    _attention_cpp.register_autograd()


# ---------------------------------------------------------------------------------------------- pos_conv
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
    reasons = _pos_conv_shape_reasons(x, weight_g, weight_v, bias, groups, activation)
    if x.dtype not in _CPP_DTYPES:
        reasons.append(f"the C++ pos_conv runs float32/float64, got {x.dtype}")
    return reasons


def _pos_conv_cuda_reasons(x, weight_g, weight_v, bias, groups, activation="gelu") -> list[str]:
    reasons = _pos_conv_shape_reasons(x, weight_g, weight_v, bias, groups, activation)
    if x.device.type != "cuda":
        reasons.append(f"the CUDA pos_conv serves CUDA tensors, got {x.device.type}")
    if x.dtype not in _CUDA_POS_CONV_DTYPES:
        reasons.append(f"the CUDA pos_conv runs float32/float16/bfloat16, got {x.dtype}")
    if x.dim() == 3 and groups > 0 and x.shape[2] // groups > _CUDA_POS_CONV_MAX_CHANNELS:
        reasons.append(f"the CUDA pos_conv supports at most {_CUDA_POS_CONV_MAX_CHANNELS} channels per group, "
                       f"got {x.shape[2] // groups}")
    if not reasons and not _has_kernel("pos_conv_fwd", "CUDA"):
        reasons.append("the extension has no CUDA kernel for pos_conv_fwd")
    return reasons


def pos_conv_ext(
    x: torch.Tensor,
    weight_g: torch.Tensor,
    weight_v: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    activation: str = "gelu",
) -> torch.Tensor:
    """``x + gelu(conv(x))`` on ``torch.ops.unispeech_fast.pos_conv_fwd`` (CPU or CUDA kernel).

    The weight norm ``W = g v / ||v||`` is folded with ``torch._weight_norm`` under autograd, so the
    gradients of ``weight_g``/``weight_v`` flow through torch from the kernel's ``grad_weight``.
    """
    ops = _ops()
    weight = torch._weight_norm(weight_v, weight_g, 2).contiguous()
    save = _needs_grad(x, weight_g, weight_v, bias)
    out, _ = ops.pos_conv_fwd(x.contiguous(), weight, bias, groups, save)
    return out


dispatch.register("pos_conv", "cpp", not_supported_reasons=_pos_conv_cpp_reasons)(pos_conv_ext)
dispatch.register("pos_conv", "cuda", not_supported_reasons=_pos_conv_cuda_reasons)(pos_conv_ext)


# ---------------------------------------------------------------------------------------------- gumbel
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
                        return_indices=False) -> list[str]:
    reasons = _gumbel_shape_reasons(logits, codevectors, num_groups, temperature)
    if logits.dtype not in _CPP_DTYPES:
        reasons.append(f"the C++ gumbel_quantizer runs float32/float64, got {logits.dtype}")
    return reasons


def _gumbel_cuda_reasons(logits, codevectors, num_groups, temperature, sample, mask=None,
                         return_indices=False) -> list[str]:
    reasons = _gumbel_shape_reasons(logits, codevectors, num_groups, temperature)
    if logits.device.type != "cuda":
        reasons.append(f"the CUDA gumbel_quantizer serves CUDA tensors, got {logits.device.type}")
    # The kernel's limits (csrc/cuda/gumbel_quantizer.cu: kMaxGroups, and V in one block's shared memory).
    if num_groups > 32:
        reasons.append(f"the CUDA gumbel_quantizer supports at most 32 groups, got num_groups={num_groups}")
    if not reasons and logits.shape[-1] // num_groups > 12288:
        reasons.append(f"the CUDA gumbel_quantizer supports at most 12288 codes per group, "
                       f"got {logits.shape[-1] // num_groups}")
    if not reasons and not _has_kernel("gumbel_quantizer_fwd", "CUDA"):
        reasons.append("the extension has no CUDA kernel for gumbel_quantizer_fwd")
    return reasons


def gumbel_quantizer_ext(
    logits: torch.Tensor,
    codevectors: torch.Tensor,
    num_groups: int,
    temperature: float,
    sample: bool,
    mask: torch.Tensor | None = None,
    return_indices: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Gumbel quantizer on ``torch.ops.unispeech_fast.gumbel_quantizer_fwd``.

    In sample mode the noise is drawn here exactly as ``F.gumbel_softmax`` draws it (float32,
    ``-Exp(1).log()`` over the ``[N*G, V]`` logits), so under one ``torch.manual_seed`` the codes equal
    the eager backend's. Eval mode gives the logits no gradient (argmax), as the eager reference.
    Returns ``(quantized [batch, frames, D], perplexity)`` in the eager reference's dtypes, plus the
    codes ``[batch, frames, G]`` (int64) with ``return_indices``; ``mask`` (bool ``[batch, frames]``)
    restricts the perplexity to its frames.
    """
    ops = _ops()
    batch, frames, gv = logits.shape
    flat = logits.reshape(batch * frames, gv)
    if not sample:
        flat = flat.detach()
    codebook = codevectors.reshape(gv, -1)
    gumbels = None
    if sample:
        noise = torch.empty((batch * frames * num_groups, gv // num_groups), dtype=torch.float32, device=logits.device)
        gumbels = -noise.exponential_().log()
        gumbels = gumbels.view(batch * frames, gv)
    rows = None if mask is None else mask.reshape(batch * frames).contiguous()
    quantized, indices, _, perplexity = ops.gumbel_quantizer_fwd(
        flat.contiguous(), codebook.contiguous(), num_groups, float(temperature), bool(sample), gumbels, 0, 0, rows
    )
    perplexity = perplexity.to(torch.float32 if sample else logits.dtype)
    if return_indices:
        return quantized.view(batch, frames, -1), perplexity, indices.view(batch, frames, num_groups)
    return quantized.view(batch, frames, -1), perplexity


_gumbel_stochastic = lambda sample=False, **_: bool(sample)  # noqa: E731
dispatch.register("gumbel_quantizer", "cpp", not_supported_reasons=_gumbel_cpp_reasons,
                  is_stochastic=_gumbel_stochastic)(gumbel_quantizer_ext)
dispatch.register("gumbel_quantizer", "cuda", not_supported_reasons=_gumbel_cuda_reasons,
                  is_stochastic=_gumbel_stochastic)(gumbel_quantizer_ext)


# ---------------------------------------------------------------------------------------------- feature extractor
def _feature_cpp_reasons(
    x, conv_weights, conv_biases, norm_weights, norm_biases, conv_strides, norm_type, activation="gelu", eps=1e-5
) -> list[str]:
    reasons = []
    if activation != "gelu":
        reasons.append(f"only activation 'gelu' is fused, got {activation!r}")
    if norm_type not in _NORM_KINDS:
        reasons.append(f"norm_type must be 'group' or 'layer', got {norm_type!r}")
    if x.dim() != 2:
        reasons.append(f"x must be a waveform [batch, samples], got {tuple(x.shape)}")
    if x.dtype not in _CPP_DTYPES:
        reasons.append(f"the C++ feature extractor runs float32/float64, got {x.dtype}")
    n = len(conv_weights)
    if not (len(conv_biases) == len(norm_weights) == len(norm_biases) == len(conv_strides) == n):
        reasons.append("conv_weights, conv_biases, norm_weights, norm_biases and conv_strides must have one entry per layer")
        return reasons
    for i in range(n):
        tensors = [conv_weights[i], conv_biases[i], norm_weights[i], norm_biases[i]]
        if any(t is not None and t.dtype != x.dtype for t in tensors):
            reasons.append(f"layer {i}: parameters must have the dtype of x ({x.dtype})")
        if (norm_weights[i] is None) != (norm_biases[i] is None):
            reasons.append(f"layer {i}: a norm needs both weight and bias")
    return reasons


def feature_extractor_ext(
    x: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor | None],
    norm_weights: Sequence[torch.Tensor | None],
    norm_biases: Sequence[torch.Tensor | None],
    conv_strides: Sequence[int],
    norm_type: str,
    activation: str = "gelu",
    eps: float = 1e-5,
) -> torch.Tensor:
    """The conv feature extractor as one ``conv_norm_gelu_fwd`` call per layer (fused conv, norm and
    GELU). Gradients come from recomputing each layer eagerly in the backward (see module docstring)."""
    ops = _ops()
    h = x[:, None]
    for w, b, gamma, beta, stride in zip(conv_weights, conv_biases, norm_weights, norm_biases, conv_strides):
        kind = 0 if gamma is None else _NORM_KINDS[norm_type]
        h = ops.conv_norm_gelu_fwd(h.contiguous(), w.contiguous(), b, gamma, beta, int(stride), kind, float(eps))
    return h


dispatch.register("feature_extractor", "cpp", not_supported_reasons=_feature_cpp_reasons)(feature_extractor_ext)
