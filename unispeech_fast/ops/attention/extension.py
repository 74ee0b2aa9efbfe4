"""The ``cpp`` and ``cuda`` backends of ``attention``: ``torch.ops.unispeech_fast.attention_fwd`` (schema in
``csrc/schemas.cpp``; kernels ``csrc/cpu/attention.cpp`` and ``csrc/cuda/attention.cu``), its fake and autograd
formula (registered when the extension loads, :func:`unispeech_fast.ops._extension_ops.on_load`), and the
dispatch entries. Importing this module loads nothing.

``cpp``: the kernel -> its fake and autograd formula
(:func:`_register`; the backward is the C++ ``attention_bwd`` for float32/float64 CPU tensors without a
head_mask gradient, else it recomputes the forward with PyTorch's SDPA under autograd,
activation-checkpoint style, in fp32 for half inputs, with the reference's masking) -> the dispatch backend
:func:`attention_cpp` (argument handling, ``not_supported_reasons``).

The forward runs float32, bfloat16, float16 and float64 CPU tensors. bfloat16 products run in bf16 with
fp32 accumulation (AVX512_BF16 microkernels, or MKL's bf16 GEMM on CPUs without them), the scores, softmax
statistics and accumulator are fp32, and the probabilities are rounded to bf16 for the product with V;
float16 is widened to fp32; the output is rounded to the input dtype once (see the kernel's header
comment). Key padding must be right-padded (given to the kernel as lengths); a row with no valid key
attends to every key uniformly, as the reference does. Dropout is refused; ``need_weights=True`` is
served by the reference (logged once), which returns the probabilities. ``backend("auto")`` takes it for
inference only: its backward is not measured faster than the eager backend's.

``cuda``: the CUDA flash-attention forward, inference only (float16/bfloat16, head_dim 64 or 128). The
CUDA kernels were written on a machine without a GPU: they are compile-checked for sm_80 and sm_90 by
``scripts/check_cuda.py`` and compared with the eager references by the ``gpu``-marked tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _extension, dispatch
from .._extension_ops import _ops, cuda_ops, on_load
from .padding import mask_lengths, padding_mask_reasons, right_padded_lengths
from .reference import attention_ref
from .triton import _last_dim_contiguous, _qkv_dtype_reasons, _qkv_shape_reasons

__all__ = ["CUDA_DTYPES", "attention_cpp", "attention_cuda"]

_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CPP_MAX_HEAD_DIM = 1024  # the kernel's limit (csrc/cpu/attention.cpp)
_AUTO_SKIPS_TRAINING = (
    "auto does not take the C++ attention for calls that need gradients: its backward (C++ for float32/float64, "
    "else a recomputation through SDPA) is not measured faster than eager's; force it with backend('cpp')"
)
_CPP_BWD_DTYPES = (torch.float32, torch.float64)  # what attention_bwd runs (csrc/cpu/attention.cpp)
_CUDA_HEAD_DIMS = (64, 128)
#: What the CUDA kernel runs (tensor cores; csrc/cuda/attention.cu).
CUDA_DTYPES = (torch.float16, torch.bfloat16)
_NO_BACKWARD = "the CUDA attention has no backward; the triton backend serves training"


# ---------------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, seqlens, head_mask, scale = inputs
    ctx.scale = scale
    # The output only serves the C++ backward (the recomputing one does not read it): not kept otherwise.
    keep_output = _cpp_backward_runs(q, ctx.needs_input_grad)
    ctx.save_for_backward(q, k, v, seqlens, head_mask, output if keep_output else None)


def _cpp_backward_runs(q, needs_input_grad) -> bool:
    """Whether the C++ backward ``attention_bwd`` serves this call: CPU float32/float64, no gradient for
    head_mask, and an extension that has the kernel."""
    return (q.device.type == "cpu" and q.dtype in _CPP_BWD_DTYPES and not needs_input_grad[4]
            and _extension.has_kernel("attention_bwd", "cpu"))


def _backward(ctx, grad_out):
    """VJP of ``attention_fwd``. On CPU in float32/float64 without a head_mask gradient: the C++ backward
    ``attention_bwd`` (recomputes the probabilities from q and k; see its header in
    ``csrc/cpu/attention.cpp``). Otherwise by recomputing the forward under autograd with PyTorch's SDPA
    (its CPU flash attention and backward; half inputs in fp32) and differentiating that: the forward
    kernel keeps no softmax statistics. The key padding goes in as an additive ``finfo.min`` mask, which is
    the reference's masked_fill: padded keys get probability 0, and a row with no valid key attends to
    every key uniformly, with no gradient to its q and k (as the reference's masked_fill gives)."""
    q, k, v, seqlens, head_mask, out = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if _cpp_backward_runs(q, needs):
        dq, dk, dv = _ops().attention_bwd(_last_dim_contiguous(grad_out), q, k, v, out, seqlens, head_mask, ctx.scale)
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(bool(n))
                  for t, n in zip((q, k, v, head_mask), (needs[0], needs[1], needs[2], needs[4]))]
        qh, kh, vh = (t.to(compute).transpose(1, 2) for t in leaves[:3])
        mask = None
        if seqlens is not None:
            # A batch row with no valid key: the reference replaces all its scores (equal scores, no
            # gradient to q or k). Here: no mask and q = 0 there, so the scores are 0, the attention is
            # uniform and q, k get no gradient from that row. (An all-finfo.min row would not do: SDPA's
            # backward rebuilds P from a logsumexp in which min + log(T) rounds to min.)
            empty = seqlens == 0
            padded = (torch.arange(q.shape[1], device=q.device)[None, :] >= seqlens[:, None]) & ~empty[:, None]
            mask = torch.zeros(padded.shape, device=q.device, dtype=compute)
            mask = mask.masked_fill(padded, torch.finfo(compute).min)[:, None, None, :]
            qh = torch.where(empty[:, None, None, None], torch.zeros_like(qh), qh)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=ctx.scale)
        if leaves[3] is not None:
            out = out * leaves[3].to(compute).view(1, -1, 1, 1)
        out = out.transpose(1, 2)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out.to(compute)) if wanted else ())
    dq, dk, dv, dhm = (next(grads) if (t is not None and t.requires_grad) else None for t in leaves)
    return dq, dk, dv, None, dhm, None


@on_load("attention_fwd")
def _register() -> None:
    """Register the fake and the recomputing backward of ``unispeech_fast::attention_fwd`` (called once the
    extension is loaded, by :func:`unispeech_fast.ops._extension_ops.ensure_registered`)."""

    @torch.library.register_fake("unispeech_fast::attention_fwd")
    def _(q, k, v, seqlens, head_mask, scale):
        return q.new_empty(q.shape)

    if _extension.has_kernel("attention_bwd", "cpu"):  # an extension built before it existed lacks it

        @torch.library.register_fake("unispeech_fast::attention_bwd")
        def _(grad_out, q, k, v, out, seqlens, head_mask, scale):
            return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)

    torch.library.register_autograd("unispeech_fast::attention_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- cpp
def _cpp_reasons(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None, need_weights=False):
    """Why the C++ attention cannot run this call (empty when it can)."""
    if need_weights:
        return []  # served by the reference (the kernel never materialises the probabilities)
    shape_reasons = _qkv_shape_reasons(q, k, v)
    if shape_reasons:
        return shape_reasons
    reasons = _qkv_dtype_reasons(q, k, v, _CPP_DTYPES, "the C++ attention runs float32, bfloat16, float16 or float64")
    tensors = {"q": q, "k": k, "v": v}
    if q.shape[-1] > _CPP_MAX_HEAD_DIM:
        reasons.append(f"the C++ attention supports head_dim <= {_CPP_MAX_HEAD_DIM}, got {q.shape[-1]}")
    if dropout_p > 0.0:
        reasons.append(f"the C++ attention has no dropout (training with attention dropout), got dropout_p={dropout_p}")
    if dispatch.current_backend() == "auto" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        reasons.append(_AUTO_SKIPS_TRAINING)
    if head_mask is not None and (head_mask.dim() != 1 or head_mask.shape[0] != q.shape[2]
                                  or not head_mask.is_floating_point() or head_mask.device.type != "cpu"):
        reasons.append(f"head_mask must be a floating-point CPU tensor of shape [heads] = ({q.shape[2]},), got "
                       f"{head_mask.dtype} {tuple(head_mask.shape)} on {head_mask.device.type}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != q.shape[:2]:
            reasons.append(f"key_padding_mask must be bool [batch, frames] = {tuple(q.shape[:2])}, got "
                           f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        elif key_padding_mask.device.type != "cpu":
            reasons.append(f"key_padding_mask must be a CPU tensor, got {key_padding_mask.device.type}")
        elif not torch.compiler.is_compiling() and right_padded_lengths(key_padding_mask) is None:
            # Data-dependent (one pass over the mask); skipped while torch.compile traces, where the
            # models' guarantee (right padding) is relied on.
            reasons.append("the C++ attention needs a right-padded key_padding_mask (valid keys first) in every row")
    return reasons


def attention_cpp(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None, need_weights=False):
    """Flash attention on ``torch.ops.unispeech_fast.attention_fwd`` (CPU); see :func:`attention_ref`.

    q, k, v ``[batch, frames, heads, head_dim]`` (strided views of one fused projection are used in
    place); returns ``(out [batch, frames, heads, head_dim] contiguous, None)``. ``need_weights=True``
    is served by the reference (logged once).
    """
    if need_weights:
        dispatch.log_once("attention-cpp-need-weights", "attention: the cpp backend does not materialise the "
                          "attention probabilities; calls with need_weights=True run the eager reference")
        return attention_ref(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights=True)
    ops = _ops()
    # Dispatch checked the mask is right-padded (_cpp_reasons), so its row sums are the lengths.
    seqlens = None if key_padding_mask is None else key_padding_mask.sum(dim=-1, dtype=torch.int32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return ops.attention_fwd(q, k, v, seqlens, head_mask, scale), None



# ---------------------------------------------------------------------------------------------- cuda
def _cuda_reasons(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None, need_weights=False):
    reasons = []
    tensors = {"q": q, "k": k, "v": v}
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        reasons.append(f"q, k and v must be [batch, frames, heads, head_dim] of one shape, got "
                       f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    elif q.shape[-1] not in _CUDA_HEAD_DIMS:
        reasons.append(f"the CUDA attention supports head_dim {_CUDA_HEAD_DIMS}, got {q.shape[-1]}")
    if any(t.dim() > 0 and t.stride(-1) != 1 for t in tensors.values()):
        reasons.append("q, k and v need a contiguous last dim")
    if need_weights:
        reasons.append("the CUDA attention does not return the attention probabilities (need_weights=True)")
    if dropout_p > 0.0:
        reasons.append(f"the CUDA attention has no dropout, got dropout_p={dropout_p}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        reasons.append(_NO_BACKWARD)
    if head_mask is not None:
        if head_mask.dim() != 1 or q.dim() != 4 or head_mask.shape[0] != q.shape[2]:
            reasons.append(f"head_mask must be [heads], got {tuple(head_mask.shape)}")
        if torch.is_grad_enabled() and head_mask.requires_grad:
            reasons.append("head_mask requires grad, but " + _NO_BACKWARD)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or q.dim() != 4 or key_padding_mask.shape != q.shape[:2]:
            reasons.append(f"key_padding_mask must be bool [batch, frames], got {key_padding_mask.dtype} "
                           f"{tuple(key_padding_mask.shape)}")
        elif not reasons and not torch.compiler.is_compiling():
            # Data-dependent (host syncs); under torch.compile the models' guarantee is relied on, and a row
            # without valid keys still gets the reference's uniform attention from the kernel.
            reasons.extend(padding_mask_reasons(key_padding_mask))
    return reasons


def attention_cuda(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None, need_weights=False):
    """Flash-attention forward (``torch.ops.unispeech_fast.attention_fwd``); inference only.

    ``out = head_mask[h] * softmax(scale q k^T + mask) v`` with the key padding given as lengths (the
    mask must be right-padded). Dispatch refuses a row whose keys are all padded; the kernel itself
    gives such a row the reference's uniform attention over every key. Returns ``(out, None)``.
    """
    # Dispatch checked the mask is right-padded (_cuda_reasons), so its row sums are the lengths.
    seqlens = None if key_padding_mask is None else mask_lengths(key_padding_mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out = cuda_ops().attention_fwd(q, k, v, seqlens, head_mask, float(scale))
    return out, None
