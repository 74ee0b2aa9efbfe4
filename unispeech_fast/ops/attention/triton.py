"""The ``triton`` backend of ``attention``: launchers for ``unispeech_fast.kernels.attention``, the custom
ops ``unispeech_fast::triton_attention_fwd`` / ``_bwd`` with fakes and autograd, and the dispatch entry."""

from __future__ import annotations

from typing import Optional

import torch

from ... import dispatch
from .._triton_common import cdiv, device_guard, fp32_dot_precision
from .padding import mask_lengths, padding_mask_reasons
from .reference import attention_eager

# Layers: private kernels (``unispeech_fast.kernels.attention``) -> launchers ``_triton_fwd`` /
# ``_triton_bwd`` (allocate, pick blocks, launch) -> custom ops ``unispeech_fast::triton_attention_fwd``
# / ``_bwd`` (fake shapes and autograd, so the op composes with torch.compile) -> the registered
# backend function ``_attention_triton`` (argument handling) -> the public :func:`attention`.

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128
_MAX_DROPOUT_FRAMES = 46340  # the Philox counter query * N + key must fit in int32
_MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, which carries batch * heads


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take the batch/frame/head strides as given but need unit stride along head_dim.
    return t if t.stride(-1) == 1 else t.contiguous()


def _qkv_shape_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """The triton and cpp kernels' shape rule (self-attention): q, k and v share one 4-d shape."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return [f"q, k and v must share one [batch, frames, heads, head_dim] shape, got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (self-attention only)"]
    return []


def _qkv_dtype_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtypes: tuple, rule: str) -> list[str]:
    """The triton and cpp kernels' dtype rule: q, k and v share one dtype of ``dtypes``, which ``rule`` names."""
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        return [f"{rule} for q, k and v alike, got {q.dtype}, {k.dtype}, {v.dtype}"]
    return []


_device_guard = device_guard


def _ieee(q: torch.Tensor) -> bool:
    """Whether the fp32 dots stay IEEE fp32 (the package's policy; fp16/bf16 dots are never affected)."""
    return q.dtype == torch.float32 and fp32_dot_precision(q.device) == "ieee"


def _launch_settings(q: torch.Tensor, kernel: str) -> tuple[int, int, int, int, int]:
    from unispeech_fast.kernels import attention as kern

    dtype_name = str(q.dtype).replace("torch.", "")
    block_d = kern.block_d_for(q.shape[-1])
    block_m, block_n, warps, stages = kern.config_for(dtype_name, q.shape[-1], kernel, q.device.type == "cpu")
    return block_m, block_n, block_d, warps, stages


def _placeholders(q, head_mask, seed):
    # Absent optional inputs are replaced by one-element tensors of the pointer type the kernel is
    # compiled for (the HAS_* constexprs keep them unread), so every launch matches an AOT variant.
    hm = head_mask if head_mask is not None else torch.ones(1, device=q.device, dtype=torch.float32)
    sd = seed if seed is not None else torch.zeros(1, device=q.device, dtype=torch.int64)
    return hm, sd


def _triton_fwd(q, k, v, lengths, head_mask, seed, dropout_p, scale):
    """Launch the forward kernel; returns ``(out [B, N, H, D] contiguous, lse fp32 [B, H, N])``."""
    from unispeech_fast.kernels import attention as kern

    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, frames, heads, head_dim = q.shape
    out = torch.empty((batch, frames, heads, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, frames), device=q.device, dtype=torch.float32)
    hm, sd = _placeholders(q, head_mask, seed)
    block_m, block_n, block_d, warps, stages = _launch_settings(q, "fwd")
    grid = (cdiv(frames, block_m), batch * heads)
    with _device_guard(q.device):
        kern._attn_fwd[grid](
            q, k, v, out, lse, lengths, hm, sd,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            heads, frames, head_dim, float(scale), float(dropout_p),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            HAS_HEAD_MASK=head_mask is not None, HAS_DROPOUT=dropout_p > 0.0, IEEE=_ieee(q),
            num_warps=warps, num_stages=stages,
        )
    return out, lse


def _triton_bwd(dout, q, k, v, lse, lengths, head_mask, seed, dropout_p, scale):
    """Launch the backward kernels: delta per query block, dK/dV per key block, dQ per query block."""
    from unispeech_fast.kernels import attention as kern

    dout, q, k, v = (_last_dim_contiguous(t) for t in (dout, q, k, v))
    batch, frames, heads, head_dim = q.shape
    dq = torch.empty((batch, frames, heads, head_dim), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    delta = torch.empty((batch, heads, frames), device=q.device, dtype=torch.float32)
    hm, sd = _placeholders(q, head_mask, seed)
    flags = dict(HAS_HEAD_MASK=head_mask is not None, HAS_DROPOUT=dropout_p > 0.0, IEEE=_ieee(q))
    with _device_guard(q.device):
        rows_args = (
            q, k, v, dout, lse, delta, dq, lengths, hm, sd,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            heads, frames, head_dim, float(scale), float(dropout_p),
        )
        block_m, block_n, block_d, warps, stages = _launch_settings(q, "bwd_pre")
        kern._attn_bwd_rows[(cdiv(frames, block_m), batch * heads)](
            *rows_args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **flags, COMPUTE_DQ=False,
            num_warps=warps, num_stages=stages,
        )
        block_m, block_n, block_d, warps, stages = _launch_settings(q, "bwd_kv")
        kern._attn_bwd_dkdv[(cdiv(frames, block_n), batch * heads)](
            q, k, v, dout, dk, dv, lse, delta, lengths, hm, sd,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            heads, frames, head_dim, float(scale), float(dropout_p),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **flags, num_warps=warps, num_stages=stages,
        )
        block_m, block_n, block_d, warps, stages = _launch_settings(q, "bwd_q")
        kern._attn_bwd_rows[(cdiv(frames, block_m), batch * heads)](
            *rows_args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **flags, COMPUTE_DQ=True,
            num_warps=warps, num_stages=stages,
        )
    return dq, dk, dv


@torch.library.custom_op("unispeech_fast::triton_attention_fwd", mutates_args=())
def _triton_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    head_mask: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton flash-attention forward: ``(out [B, N, H, D], lse fp32 [B, H, N])``.

    ``lengths`` int32 ``[B]`` (valid keys per row, right padding), ``head_mask`` fp32 ``[H]`` or None,
    ``seed`` int64 ``[1]`` (the Philox seed, required when ``dropout_p > 0``)."""
    return _triton_fwd(q, k, v, lengths, head_mask, seed, dropout_p, scale)


@_triton_attention_fwd.register_fake
def _(q, k, v, lengths, head_mask, seed, dropout_p, scale):
    batch, frames, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, frames), dtype=torch.float32)


@torch.library.custom_op("unispeech_fast::triton_attention_bwd", mutates_args=())
def _triton_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    lengths: torch.Tensor,
    head_mask: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton flash-attention backward: ``(dq, dk, dv)``, each ``[B, N, H, D]`` contiguous."""
    return _triton_bwd(dout, q, k, v, lse, lengths, head_mask, seed, dropout_p, scale)


@_triton_attention_bwd.register_fake
def _(dout, q, k, v, lse, lengths, head_mask, seed, dropout_p, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, lengths, head_mask, seed, dropout_p, scale = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, lse, lengths, head_mask, seed)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _fwd_backward(ctx, dout, dlse):
    # ``lse`` is an internal by-product (the public functional never returns it): its gradient is ignored.
    q, k, v, lse, lengths, head_mask, seed = ctx.saved_tensors
    dq, dk, dv = _triton_attention_bwd(dout, q, k, v, lse, lengths, head_mask, seed, ctx.dropout_p, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_triton_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _triton_reasons(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None, need_weights=False):
    """Why the Triton kernels cannot run this call (empty when they can)."""
    if need_weights:
        return []  # served by the eager path (the kernels never materialise the probabilities)
    shape_reasons = _qkv_shape_reasons(q, k, v)
    if shape_reasons:
        return shape_reasons
    reasons = _qkv_dtype_reasons(q, k, v, _TRITON_DTYPES, "dtype must be float16, bfloat16 or float32")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        reasons.append("bfloat16 is computed incorrectly by the Triton interpreter (CPU tensors); use a GPU")
    if not 1 <= q.shape[-1] <= _MAX_HEAD_DIM:
        reasons.append(f"head_dim must be in 1..{_MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.shape[0] * q.shape[2] > _MAX_GRID_Y:
        reasons.append(f"batch * heads must be at most {_MAX_GRID_Y} (the kernels' grid axis 1), got "
                       f"{q.shape[0]} * {q.shape[2]} = {q.shape[0] * q.shape[2]}")
    if not k.device == v.device == q.device:
        reasons.append(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not 0.0 <= dropout_p < 1.0:
        reasons.append(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and q.shape[1] > _MAX_DROPOUT_FRAMES:
        reasons.append(f"dropout supports at most {_MAX_DROPOUT_FRAMES} frames (int32 Philox counters), "
                       f"got {q.shape[1]}")
    if head_mask is not None:
        if head_mask.shape != (q.shape[2],):
            reasons.append(f"head_mask must have shape [heads] = ({q.shape[2]},), got {tuple(head_mask.shape)}")
        if head_mask.requires_grad and torch.is_grad_enabled():
            reasons.append("the Triton kernels do not compute a gradient for head_mask, which requires grad")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != q.shape[:2]:
            reasons.append(f"key_padding_mask must be bool [batch, frames] = {tuple(q.shape[:2])}, got "
                           f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        elif not torch.compiler.is_compiling():
            # Data-dependent checks (host syncs); skipped while torch.compile traces, where the models'
            # guarantee (right padding) is relied on and an empty row gets the reference's value.
            reasons.extend(padding_mask_reasons(key_padding_mask))
    return reasons


def _attention_triton(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None, need_weights=False):
    """The triton backend: flash attention without materialising the probabilities.

    ``need_weights=True`` is served by the eager path (logged once). Dropout draws its Philox seed
    from torch's default generator of ``q``'s device, so ``torch.manual_seed`` reproduces a run.
    """
    if need_weights:
        dispatch.log_once("attention-triton-need-weights", "attention: the triton backend does not materialise "
                          "the attention probabilities; calls with need_weights=True run the eager path")
        return attention_eager(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights=True)
    batch, frames = q.shape[:2]
    if key_padding_mask is None:
        lengths = torch.full((batch,), frames, device=q.device, dtype=torch.int32)
    else:
        lengths = mask_lengths(key_padding_mask)
    hm = None if head_mask is None else head_mask.detach().to(device=q.device, dtype=torch.float32).contiguous()
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _triton_attention_fwd(q, k, v, lengths, hm, seed, float(dropout_p), scale)
    return out, None
