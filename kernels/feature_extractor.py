"""Triton kernels for the conv feature extractor: one fused kernel family per conv layer.

Every conv is an implicit GEMM: with the reduction index ``j = ci * K + k`` (``J = C_in * K``)

    z[b, co, t] = bias[co] + sum_j W[co, j] * x[b, j // K, t * S + j % K]

accumulated in fp32 by ``tl.dot`` over ``BLOCK_J`` slices of ``j`` (the ``x`` operand is gathered
straight from the input; no im2col tensor exists in memory). Layer 0 (``C_in = 1``, ``K = 10``) is the
same GEMM with ``J = K``. After the conv, in registers:

* ``NORM_NONE``:   y = gelu(z)
* ``NORM_LAYER``:  y = gelu(gamma * (z - mu_t) * rstd_t + beta), statistics over the channels of each
  frame (one program holds all ``C_out`` channels of a ``BLOCK_T``-frame tile).
* group norm (per-(batch, channel) statistics over the whole time axis) in two launches:
  ``NORM_GROUP_STATS`` computes each tile's mean and M2 (sum of squared deviations from the tile
  mean) per channel; :func:`_group_stats_kernel` combines the tiles with Chan's parallel formula
  (mean_ab = mean_a + d * n_b / n, M2_ab = M2_a + M2_b + d^2 * n_a * n_b / n, d = mean_b - mean_a),
  which stays accurate for long inputs where plain sum / sum-of-squares in fp32 would cancel;
  ``NORM_GROUP_APPLY`` recomputes the (cheap) conv and normalises, so the pre-norm activation is
  never stored (peak memory = output + statistics).

gelu is the exact erf form, gelu(a) = a * Phi(a), gelu'(a) = Phi(a) + a * phi(a).

Backward (VJP) of one layer, given gy = dL/dy and the layer input x, recomputing z:

* ga = gy * gelu'(a), a the gelu input (a = z without a norm).
* no norm: gz = ga.
* layer norm (per frame, N = C_out): xhat = (z - mu) * rstd, g = ga * gamma,
  gz = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)); dgamma = sum_{b,t} ga * xhat, dbeta = sum ga.
* group norm (per (b, c), N = T): gz = rstd * gamma * (ga - sum_t(ga) / T - xhat * sum_t(ga * xhat) / T),
  the two time sums coming from a first reduction launch (``NORM_GROUP_STATS``).
* dbias = sum_{b,t} gz, dW[co, j] = sum_{b,t} gz[b, co, t] * x[b, j // K, t * S + j % K]
  (:func:`_conv_bwd_weight_kernel`), dx[b, ci, u] = sum_{co,k: u = t*S + k} W[co, ci, k] * gz[b, co, t]
  (:func:`_conv_bwd_input_kernel`, per phase u mod S an implicit GEMM over (co, tap) with a gather of gz).

All sums accumulate in fp32; inputs may be fp16/bf16/fp32 (fp32 GEMMs follow the package's one policy,
``torch.get_float32_matmul_precision()``: IEEE at torch's default ``"highest"``, TF32 otherwise). Per-tile partial sums (dgamma, dbeta, dbias, the group-norm time sums, the split-T weight
gradient) are written to fp32 buffers and reduced by the launcher with ``torch.sum`` (deterministic,
no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from unispeech_fast.ops.feature_extractor.common import NormKind, conv_output_length

from .aot import AotVariant

__all__ = ["NORM_NONE", "NORM_LAYER", "NORM_GROUP", "layer_forward", "layer_backward", "aot_variants"]

#: The launchers' ``norm`` argument: the codes every backend shares (:class:`NormKind`, one table with the C++
#: schema). The kernels' ``NORM`` constexpr is a finer, kernel-level mode (the group norm runs as a statistics
#: pass and an apply pass); its values name the AOT variants and the known-spill table, so they stay as they are.
NORM_NONE, NORM_GROUP, NORM_LAYER = NormKind.NONE, NormKind.GROUP, NormKind.LAYER
_K_NONE = 0
_K_LAYER = 1
_GROUP_STATS = 2
_GROUP_APPLY = 3

# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _conv_tile(X, W, Bias, pid_b, offs_co, offs_t, C_out, C_in, T_out, conv_stride, ksize,
               stride_xb, stride_xc, stride_xl, stride_wo, stride_wi, stride_wk,
               BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr):
    """z[co, t] = bias[co] + sum_j W[co, j // K, j % K] * x[b, j // K, t * S + j % K] (fp32), 0 outside C_out x T_out."""
    acc = tl.zeros((BLOCK_CO, BLOCK_T), dtype=tl.float32)
    J = C_in * ksize
    mask_co = offs_co < C_out
    mask_t = offs_t < T_out
    X_b = X + pid_b.to(tl.int64) * stride_xb
    pos_t = offs_t.to(tl.int64) * conv_stride
    w_rows = offs_co.to(tl.int64) * stride_wo
    for j0 in range(0, J, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < J
        ci = (offs_j // ksize).to(tl.int64)
        kk = (offs_j % ksize).to(tl.int64)
        w = tl.load(W + w_rows[:, None] + ci[None, :] * stride_wi + kk[None, :] * stride_wk,
                    mask=mask_co[:, None] & mask_j[None, :], other=0.0)
        xv = tl.load(X_b + ci[:, None] * stride_xc + (pos_t[None, :] + kk[:, None]) * stride_xl,
                     mask=mask_j[:, None] & mask_t[None, :], other=0.0)
        acc += tl.dot(w, xv, input_precision=PRECISION)
    bias = tl.load(Bias + offs_co, mask=mask_co, other=0.0).to(tl.float32)
    return tl.where(mask_co[:, None] & mask_t[None, :], acc + bias[:, None], 0.0)


@triton.jit
def _layer_tile(X, W, Bias, C_out, C_in, T_out, conv_stride, ksize,
                stride_xb, stride_xc, stride_xl, stride_wo, stride_wi, stride_wk,
                BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr):
    """This program's tile of one layer, grid (t tiles, co tiles, batch): ``(pid_t, pid_b, offs_co, offs_t,
    mask_co, mask_t, z)`` with ``z`` = :func:`_conv_tile`. The forward and the backward (which recomputes ``z``)
    take their tile from here, so the two see the same ``z``."""
    pid_t = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    z = _conv_tile(X, W, Bias, pid_b, offs_co, offs_t, C_out, C_in, T_out, conv_stride, ksize,
                   stride_xb, stride_xc, stride_xl, stride_wo, stride_wi, stride_wk,
                   BLOCK_CO, BLOCK_T, BLOCK_J, PRECISION)
    return pid_t, pid_b, offs_co, offs_t, offs_co < C_out, offs_t < T_out, z


@triton.jit
def _norm_stats(Stat0, Stat1, idx, mask):
    """The saved ``(mean, rstd)`` at ``idx``: frames for the layer norm, (batch, channel) rows for the group norm."""
    return tl.load(Stat0 + idx, mask=mask, other=0.0), tl.load(Stat1 + idx, mask=mask, other=0.0)


@triton.jit
def _norm_affine(Gamma, Beta, offs_co, mask_co):
    """The norm's ``(gamma, beta)`` of channels ``offs_co``, in fp32."""
    gamma = tl.load(Gamma + offs_co, mask=mask_co, other=0.0).to(tl.float32)
    beta = tl.load(Beta + offs_co, mask=mask_co, other=0.0).to(tl.float32)
    return gamma, beta


@triton.jit
def _gelu(a):
    return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))


@triton.jit
def _gelu_grad(a):
    return 0.5 * (1.0 + tl.erf(a * 0.7071067811865476)) + a * tl.exp(-0.5 * a * a) * 0.3989422804014327


@triton.jit
def _fe_layer_fwd_kernel(
    X, W, Bias, Gamma, Beta, Y, Stat0, Stat1,
    C_out, C_in, T_out, conv_stride, ksize, eps,
    stride_xb, stride_xc, stride_xl, stride_wo, stride_wi, stride_wk, stride_yb, stride_yc, stride_yl,
    NORM: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One conv layer forward, fused with bias, norm and exact gelu (see the module docstring).

    Grid (t tiles, co tiles, batch). NORM 0: y = gelu(z). NORM 1 (layer norm, one co tile): y =
    gelu(gamma * (z - mu_t) * rstd_t + beta), writes mu_t, rstd_t to Stat0/Stat1 ``[B, T_out]``.
    NORM 2: writes this tile's per-channel mean and M2 to Stat0/Stat1 ``[B * C_out, n_t_tiles]``, no y.
    NORM 3: y = gelu(gamma * (z - mean) * rstd + beta) with Stat0/Stat1 = mean, rstd ``[B * C_out]``.
    """
    pid_t, pid_b, offs_co, offs_t, mask_co, mask_t, z = _layer_tile(
        X, W, Bias, C_out, C_in, T_out, conv_stride, ksize, stride_xb, stride_xc, stride_xl,
        stride_wo, stride_wi, stride_wk, BLOCK_CO, BLOCK_T, BLOCK_J, PRECISION)
    mask = mask_co[:, None] & mask_t[None, :]
    if NORM == 2:
        n_valid = tl.minimum(T_out - pid_t * BLOCK_T, BLOCK_T).to(tl.float32)
        tile_mean = tl.sum(z, axis=1) / n_valid
        d = tl.where(mask, z - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(d * d, axis=1)
        rows = (pid_b * C_out + offs_co).to(tl.int64) * tl.num_programs(0) + pid_t
        tl.store(Stat0 + rows, tile_mean, mask=mask_co)
        tl.store(Stat1 + rows, tile_m2, mask=mask_co)
    else:
        if NORM == 1:
            mean = tl.sum(z, axis=0) / C_out
            d = tl.where(mask, z - mean[None, :], 0.0)
            var = tl.sum(d * d, axis=0) / C_out
            rstd = 1.0 / tl.sqrt(var + eps)
            gamma, beta = _norm_affine(Gamma, Beta, offs_co, mask_co)
            a = d * rstd[None, :] * gamma[:, None] + beta[:, None]
            frames = pid_b.to(tl.int64) * T_out + offs_t
            tl.store(Stat0 + frames, mean, mask=mask_t)
            tl.store(Stat1 + frames, rstd, mask=mask_t)
        elif NORM == 3:
            rows = pid_b.to(tl.int64) * C_out + offs_co
            mean, rstd = _norm_stats(Stat0, Stat1, rows, mask_co)
            gamma, beta = _norm_affine(Gamma, Beta, offs_co, mask_co)
            a = (z - mean[:, None]) * (rstd * gamma)[:, None] + beta[:, None]
        else:
            a = z
        y = _gelu(a)
        Y_ptrs = (Y + pid_b.to(tl.int64) * stride_yb + offs_co[:, None].to(tl.int64) * stride_yc
                  + offs_t[None, :].to(tl.int64) * stride_yl)
        tl.store(Y_ptrs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_stats_kernel(PartMean, PartM2, Mean, Rstd, n_rows, n_tiles, T_out, eps,
                        TILE_T: tl.constexpr, BLOCK_TILES: tl.constexpr):
    """Combine the per-tile (mean, M2) of one (batch, channel) row; rstd = 1/sqrt(M2/T + eps).

    Grid ``(B * C_out,)``: one program per row, reading its row of partials BLOCK_TILES at a time
    (contiguous, coalesced). A chunk of tiles (counts n_i, means m_i, M2_i) merges in parallel:
    ``n = sum n_i``, ``mean = sum n_i m_i / n``, ``M2 = sum M2_i + sum n_i (m_i - mean)^2``; the chunk
    then joins the running statistics with Chan's pairwise formula. At one hour of audio (about 90k
    tiles per row at layer 0) that is about 90 dependent steps per program instead of 90k.
    """
    row = tl.program_id(0).to(tl.int64)
    base = row * n_tiles
    offs = tl.arange(0, BLOCK_TILES)
    n_a = 0.0
    mean_a = 0.0
    m2_a = 0.0
    for start in range(0, n_tiles, BLOCK_TILES):
        tiles = start + offs
        ok = tiles < n_tiles
        n_i = tl.where(ok, tl.minimum(T_out - tiles * TILE_T, TILE_T), 0).to(tl.float32)
        mean_i = tl.load(PartMean + base + tiles, mask=ok, other=0.0)
        m2_i = tl.load(PartM2 + base + tiles, mask=ok, other=0.0)
        n_b = tl.sum(n_i, axis=0)
        mean_b = tl.sum(n_i * mean_i, axis=0) / n_b
        d_i = mean_i - mean_b
        m2_b = tl.sum(m2_i, axis=0) + tl.sum(n_i * d_i * d_i, axis=0)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    rstd = 1.0 / tl.sqrt(m2_a / n_a + eps)
    tl.store(Mean + row, mean_a)
    tl.store(Rstd + row, rstd)


@triton.jit
def _fe_layer_bwd_norm_kernel(
    X, W, Bias, Gamma, Beta, GY, GZ, Stat0, Stat1, Sum0, Sum1, PartGBias, inv_t,
    C_out, C_in, T_out, conv_stride, ksize,
    stride_xb, stride_xc, stride_xl, stride_wo, stride_wi, stride_wk,
    stride_gyb, stride_gyc, stride_gyl,
    NORM: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Backward through gelu and the norm of one layer, recomputing z = conv(x) + bias (see module docstring).

    Grid (t tiles, co tiles, batch); GZ is contiguous ``[B, C_out, T_out]``; per-tile fp32 partials use the
    row ``b * n_t_tiles + t_tile``. NORM 0: gz = gy * gelu'(z). NORM 1 (one co tile): layer-norm VJP,
    Sum0/Sum1 ``[B * n_t, C_out]`` get sum_t ga * xhat and sum_t ga (dgamma, dbeta partials). NORM 2:
    Sum0/Sum1 ``[B * C_out, n_t]`` get the tile sums of ga and ga * xhat, no gz. NORM 3: group-norm VJP
    with Sum0/Sum1 ``[B * C_out]`` the full time sums of ga and ga * xhat. NORM 0/1/3 write
    PartGBias ``[B * n_t, C_out]`` = sum_t gz.
    """
    pid_t, pid_b, offs_co, offs_t, mask_co, mask_t, z = _layer_tile(
        X, W, Bias, C_out, C_in, T_out, conv_stride, ksize, stride_xb, stride_xc, stride_xl,
        stride_wo, stride_wi, stride_wk, BLOCK_CO, BLOCK_T, BLOCK_J, PRECISION)
    n_t = tl.num_programs(0)
    mask = mask_co[:, None] & mask_t[None, :]
    gy = tl.load(GY + pid_b.to(tl.int64) * stride_gyb + offs_co[:, None].to(tl.int64) * stride_gyc
                 + offs_t[None, :].to(tl.int64) * stride_gyl, mask=mask, other=0.0).to(tl.float32)
    tile_row = pid_b.to(tl.int64) * n_t + pid_t
    if NORM == 0:
        gz = gy * _gelu_grad(z)
    elif NORM == 1:
        frames = pid_b.to(tl.int64) * T_out + offs_t
        mean, rstd = _norm_stats(Stat0, Stat1, frames, mask_t)
        gamma, beta = _norm_affine(Gamma, Beta, offs_co, mask_co)
        xhat = tl.where(mask, (z - mean[None, :]) * rstd[None, :], 0.0)
        ga = tl.where(mask, gy * _gelu_grad(xhat * gamma[:, None] + beta[:, None]), 0.0)
        g = ga * gamma[:, None]
        c1 = tl.sum(g, axis=0) / C_out
        c2 = tl.sum(g * xhat, axis=0) / C_out
        gz = rstd[None, :] * (g - c1[None, :] - xhat * c2[None, :])
        tl.store(Sum0 + tile_row * C_out + offs_co, tl.sum(ga * xhat, axis=1), mask=mask_co)
        tl.store(Sum1 + tile_row * C_out + offs_co, tl.sum(ga, axis=1), mask=mask_co)
    else:
        rows = pid_b.to(tl.int64) * C_out + offs_co
        mean, rstd = _norm_stats(Stat0, Stat1, rows, mask_co)
        gamma, beta = _norm_affine(Gamma, Beta, offs_co, mask_co)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        ga = tl.where(mask, gy * _gelu_grad(xhat * gamma[:, None] + beta[:, None]), 0.0)
        if NORM == 2:
            tl.store(Sum0 + rows * n_t + pid_t, tl.sum(ga, axis=1), mask=mask_co)
            tl.store(Sum1 + rows * n_t + pid_t, tl.sum(ga * xhat, axis=1), mask=mask_co)
        else:
            s_ga = tl.load(Sum0 + rows, mask=mask_co, other=0.0)
            s_gax = tl.load(Sum1 + rows, mask=mask_co, other=0.0)
            gz = (rstd * gamma)[:, None] * (ga - (s_ga * inv_t)[:, None] - xhat * (s_gax * inv_t)[:, None])
    if NORM != 2:
        gz = tl.where(mask, gz, 0.0)
        GZ_ptrs = (GZ + (pid_b.to(tl.int64) * C_out + offs_co[:, None].to(tl.int64)) * T_out
                   + offs_t[None, :].to(tl.int64))
        tl.store(GZ_ptrs, gz.to(GZ.dtype.element_ty), mask=mask)
        tl.store(PartGBias + tile_row * C_out + offs_co, tl.sum(gz, axis=1), mask=mask_co)


@triton.jit
def _conv_bwd_weight_kernel(
    X, GZ, PartGW, C_out, C_in, T_out, conv_stride, ksize, t_chunk, n_split,
    stride_xb, stride_xc, stride_xl,
    BLOCK_CO: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW[co, j] partial over one (batch, time chunk): sum_t gz[b, co, t] * x[b, j // K, t * S + j % K].

    Grid (j tiles, co tiles, batch * n_split); GZ contiguous ``[B, C_out, T_out]``; PartGW fp32
    ``[B * n_split, C_out, J]`` (the launcher sums axis 0).
    """
    pid_j = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_s = tl.program_id(2)
    pid_b = pid_s // n_split
    t_start = (pid_s % n_split) * t_chunk
    t_stop = tl.minimum(t_start + t_chunk, T_out)
    J = C_in * ksize
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_co = offs_co < C_out
    mask_j = offs_j < J
    ci = (offs_j // ksize).to(tl.int64)
    kk = (offs_j % ksize).to(tl.int64)
    X_b = X + pid_b.to(tl.int64) * stride_xb
    GZ_rows = GZ + (pid_b.to(tl.int64) * C_out + offs_co.to(tl.int64)) * T_out
    acc = tl.zeros((BLOCK_CO, BLOCK_J), dtype=tl.float32)
    for t0 in range(t_start, t_stop, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_stop
        g = tl.load(GZ_rows[:, None] + offs_t[None, :], mask=mask_co[:, None] & mask_t[None, :], other=0.0)
        pos = offs_t.to(tl.int64) * conv_stride
        xv = tl.load(X_b + ci[None, :] * stride_xc + (pos[:, None] + kk[None, :]) * stride_xl,
                     mask=mask_t[:, None] & mask_j[None, :], other=0.0)
        acc += tl.dot(g, xv, input_precision=PRECISION)
    out = PartGW + (pid_s.to(tl.int64) * C_out + offs_co[:, None].to(tl.int64)) * J + offs_j[None, :]
    tl.store(out, acc, mask=mask_co[:, None] & mask_j[None, :])


@triton.jit
def _conv_bwd_input_kernel(
    GZ, W, GX, C_out, C_in, L_in, T_out, conv_stride, ksize, n_taps,
    stride_wo, stride_wi, stride_wk, stride_gxb, stride_gxc, stride_gxl,
    BLOCK_CI: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """dx[b, ci, u] = sum_{co, k: u = t*S + k} W[co, ci, k] * gz[b, co, t], split by phase p = u mod S.

    For u = q * S + p only the taps k = p + m * S (m < n_taps = cdiv(K, S)) contribute, with t = q - m:
    dx[b, ci, q*S + p] = sum_{r = co * n_taps + m} W[co, ci, p + m*S] * gz[b, co, q - m], an implicit GEMM
    over r with no wasted (non-dividing) taps. Grid (q tiles, ci tiles, batch * S); GZ contiguous
    ``[B, C_out, T_out]``; positions no frame reads get 0.
    """
    pid_q = tl.program_id(0)
    pid_ci = tl.program_id(1)
    pid_bp = tl.program_id(2)
    pid_b = pid_bp // conv_stride
    phase = pid_bp % conv_stride
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_u = offs_q * conv_stride + phase
    mask_ci = offs_ci < C_in
    mask_u = offs_u < L_in
    R = C_out * n_taps
    GZ_b = GZ + pid_b.to(tl.int64) * C_out * T_out
    acc = tl.zeros((BLOCK_CI, BLOCK_Q), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        co = offs_r // n_taps
        m = offs_r % n_taps
        kk = phase + m * conv_stride
        mask_r = (offs_r < R) & (kk < ksize)
        w = tl.load(W + co[None, :].to(tl.int64) * stride_wo + offs_ci[:, None].to(tl.int64) * stride_wi
                    + kk[None, :].to(tl.int64) * stride_wk, mask=mask_ci[:, None] & mask_r[None, :], other=0.0)
        t = offs_q[None, :] - m[:, None]
        ok = (t >= 0) & (t < T_out) & mask_r[:, None]
        g = tl.load(GZ_b + co[:, None].to(tl.int64) * T_out + t.to(tl.int64), mask=ok, other=0.0)
        acc += tl.dot(w, g, input_precision=PRECISION)
    out = (GX + pid_b.to(tl.int64) * stride_gxb + offs_ci[:, None].to(tl.int64) * stride_gxc
           + offs_u[None, :].to(tl.int64) * stride_gxl)
    tl.store(out, acc.to(GX.dtype.element_ty), mask=mask_ci[:, None] & mask_u[None, :])


# ---------------------------------------------------------------------------------------------- block table
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _layer_norm_block_co(c_out: int) -> int:
    return _pow2(c_out, 64)


# GPU tables (H100-sensible for the 512-channel layers). Keys are what the launcher decides from;
# values (block sizes..., num_warps, num_stages). aot_variants() enumerates exactly these.
_GPU_FWD_TILED = dict(BLOCK_CO=128, BLOCK_T=128, BLOCK_J=32, num_warps=8, num_stages=3)
_GPU_FWD_LAYER = {  # by BLOCK_CO = next_pow2(C_out) (>= 64): all channels of a frame in one program
    64: dict(BLOCK_T=64, BLOCK_J=32, num_warps=4, num_stages=3),
    128: dict(BLOCK_T=64, BLOCK_J=32, num_warps=8, num_stages=3),
    # 32 frames: with 64 the 16-bit forward used 255 registers and spilled 176 B (sm_90); now 247, none.
    256: dict(BLOCK_T=32, BLOCK_J=32, num_warps=8, num_stages=2),
    # 16 frames: with 32 the layer-norm backward used 255 registers and spilled 2.4 KB (sm_90); now none.
    512: dict(BLOCK_T=16, BLOCK_J=32, num_warps=8, num_stages=2),
}
_GPU_BWD_WEIGHT = dict(BLOCK_CO=128, BLOCK_J=64, BLOCK_T=64, num_warps=8, num_stages=3)
_GPU_BWD_INPUT = dict(BLOCK_CI=64, BLOCK_Q=128, BLOCK_R=32, num_warps=4, num_stages=3)
# fp32 changes to the two: with the 16-bit settings the weight gradient spilled 1.4 KB (sm_80; 16 frames per
# step: 128 registers, none) and the input gradient 170-400 B (8 warps: at most 246 registers, none).
_GPU_BWD_WEIGHT_FP32 = dict(BLOCK_T=16)
_GPU_BWD_INPUT_FP32 = dict(num_warps=8)
_STATS_BLOCK = dict(BLOCK_TILES=1024, num_warps=4, num_stages=1)
_INTERP_BLOCK = 16


#: Frames per program of the norm backward (:func:`_fe_layer_bwd_norm_kernel`), which holds the recomputed conv
#: tile, the output gradient and the normalised tile at once: fewer than the forward's. With the forward's frames
#: it spilled (ptxas, Triton 3.9): 128-frame tiles 400-740 B (16-bit) and up to 2.8 KB (fp32, group norm), the
#: 256-channel layer norm at 64 frames 0.9-2.3 KB, the 64/128-channel ones 70-120 B (sm_90). With these: none.
_GPU_BWD_NORM_FRAMES = {"tiled": {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}, "layer": 32}


def _bwd_norm_cfg(cfg: dict, layer: bool, dtype: torch.dtype) -> dict:
    """The GPU blocks of the norm backward from the forward's (``cfg``): :data:`_GPU_BWD_NORM_FRAMES` frames, or
    the forward's where fewer (the 512-channel layer norm's 16)."""
    frames = _GPU_BWD_NORM_FRAMES["layer"] if layer else _GPU_BWD_NORM_FRAMES["tiled"][dtype]
    return dict(cfg, BLOCK_T=min(cfg["BLOCK_T"], frames))


def _for_dtype(cfg: dict, dtype: torch.dtype) -> dict:
    """fp32 tiles hold twice the bytes: without software pipelining (one stage) and, for the 512-channel
    layer-norm tile, half the reduction chunk, they do not spill (sm_80 and sm_90, Triton 3.9); with the
    16-bit settings they spilled 160-350 bytes."""
    if dtype != torch.float32:
        return dict(cfg)
    out = dict(cfg, num_stages=1)
    if out.get("BLOCK_CO") == 512:
        out["BLOCK_J"] = 16
    return out


def _fwd_blocks(norm: int, c_out: int, dtype: torch.dtype = torch.float16) -> dict:
    if _interpreting():
        bco = _pow2(c_out, _INTERP_BLOCK) if norm == NORM_LAYER else _INTERP_BLOCK
        return dict(BLOCK_CO=bco, BLOCK_T=_INTERP_BLOCK, BLOCK_J=_INTERP_BLOCK, num_warps=4, num_stages=1)
    if norm == NORM_LAYER:
        bco = _layer_norm_block_co(c_out)
        return _for_dtype(dict(BLOCK_CO=bco, **_GPU_FWD_LAYER[bco]), dtype)
    return _for_dtype(_GPU_FWD_TILED, dtype)


def _bwd_norm_blocks(norm: int, c_out: int, dtype: torch.dtype) -> dict:
    blocks = _fwd_blocks(norm, c_out, dtype)
    return blocks if _interpreting() else _bwd_norm_cfg(blocks, norm == NORM_LAYER, dtype)


def _gpu_bwd_blocks(cfg: dict, fp32_changes: dict, dtype: torch.dtype) -> dict:
    return dict(cfg, **fp32_changes) if dtype == torch.float32 else dict(cfg)


def _bwd_weight_blocks(dtype: torch.dtype) -> dict:
    if _interpreting():
        return dict(BLOCK_CO=_INTERP_BLOCK, BLOCK_J=_INTERP_BLOCK, BLOCK_T=_INTERP_BLOCK, num_warps=4, num_stages=1)
    return _gpu_bwd_blocks(_GPU_BWD_WEIGHT, _GPU_BWD_WEIGHT_FP32, dtype)


def _bwd_input_blocks(dtype: torch.dtype) -> dict:
    if _interpreting():
        return dict(BLOCK_CI=_INTERP_BLOCK, BLOCK_Q=2 * _INTERP_BLOCK, BLOCK_R=_INTERP_BLOCK, num_warps=4, num_stages=1)
    return _gpu_bwd_blocks(_GPU_BWD_INPUT, _GPU_BWD_INPUT_FP32, dtype)


def _precision(dtype: torch.dtype, device: torch.device | None = None) -> str:
    """fp32: the package's policy (``unispeech_fast.ops._triton_common``: torch's float32_matmul_precision;
    ``device`` None means the default policy, IEEE). fp16/bf16 dots ignore it."""
    if dtype != torch.float32:
        return "tf32"
    if device is None:
        return "ieee"
    from unispeech_fast.ops._triton_common import fp32_dot_precision

    return fp32_dot_precision(device)


def _split(blocks: dict) -> tuple[dict, dict]:
    launch = {k: blocks[k] for k in ("num_warps", "num_stages")}
    return {k: v for k, v in blocks.items() if k not in launch}, launch


# ---------------------------------------------------------------------------------------------- launchers
def layer_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                  beta: torch.Tensor | None, stride: int, norm: int, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer forward. ``x [B, C_in, L]`` -> ``(y [B, C_out, T], stat0, stat1)``.

    stats: layer norm -> (mean, rstd) ``[B, T]``; group norm -> (mean, rstd) ``[B, C_out]``; else empty.
    """
    B, C_in, L = x.shape
    C_out, _, K = weight.shape
    T = conv_output_length(L, K, stride)
    weight = weight.contiguous()
    if bias is None:
        bias = torch.zeros(C_out, device=x.device, dtype=weight.dtype)
    y = torch.empty(B, C_out, T, device=x.device, dtype=x.dtype)
    blocks, launch = _split(_fwd_blocks(norm, C_out, x.dtype))
    n_t = triton.cdiv(T, blocks["BLOCK_T"])
    grid = (n_t, triton.cdiv(C_out, blocks["BLOCK_CO"]), B)
    empty = torch.empty(0, device=x.device, dtype=torch.float32)
    gamma_arg = gamma if gamma is not None else bias
    beta_arg = beta if beta is not None else bias
    common = (C_out, C_in, T, stride, K, float(eps), *x.stride(), *weight.stride(), *y.stride())
    prec = _precision(x.dtype, x.device)
    if norm == NORM_GROUP:
        part_mean = torch.empty(B * C_out, n_t, device=x.device, dtype=torch.float32)
        part_m2 = torch.empty_like(part_mean)
        _fe_layer_fwd_kernel[grid](x, weight, bias, gamma_arg, beta_arg, y, part_mean, part_m2, *common,
                                   NORM=_GROUP_STATS, PRECISION=prec, **blocks, **launch)
        mean = torch.empty(B, C_out, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        sb = dict(_STATS_BLOCK) if not _interpreting() else dict(BLOCK_TILES=4, num_warps=4, num_stages=1)
        sblocks, slaunch = _split(sb)
        _group_stats_kernel[(B * C_out,)](
            part_mean, part_m2, mean, rstd, B * C_out, n_t, T, float(eps),
            TILE_T=blocks["BLOCK_T"], **sblocks, **slaunch)
        _fe_layer_fwd_kernel[grid](x, weight, bias, gamma_arg, beta_arg, y, mean, rstd, *common,
                                   NORM=_GROUP_APPLY, PRECISION=prec, **blocks, **launch)
        return y, mean, rstd
    if norm == NORM_LAYER:
        mean = torch.empty(B, T, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _fe_layer_fwd_kernel[grid](x, weight, bias, gamma_arg, beta_arg, y, mean, rstd, *common,
                                   NORM=_K_LAYER, PRECISION=prec, **blocks, **launch)
        return y, mean, rstd
    _fe_layer_fwd_kernel[grid](x, weight, bias, bias, bias, y, empty, empty, *common,
                               NORM=_K_NONE, PRECISION=prec, **blocks, **launch)
    return y, empty, empty.clone()


def layer_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   gamma: torch.Tensor | None, beta: torch.Tensor | None, stat0: torch.Tensor,
                   stat1: torch.Tensor, stride: int, norm: int, need_input_grad: bool
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """VJP of :func:`layer_forward`: ``(dx or None, dW, dbias [fp32 sums], dgamma or None, dbeta or None)``."""
    B, C_in, L = x.shape
    C_out, _, K = weight.shape
    T = gy.shape[-1]
    weight = weight.contiguous()
    bias_arg = bias if bias is not None else torch.zeros(C_out, device=x.device, dtype=weight.dtype)
    gamma_arg = gamma if gamma is not None else bias_arg
    beta_arg = beta if beta is not None else bias_arg
    gz = torch.empty(B, C_out, T, device=x.device, dtype=x.dtype)
    blocks, launch = _split(_bwd_norm_blocks(norm, C_out, x.dtype))
    n_t = triton.cdiv(T, blocks["BLOCK_T"])
    grid = (n_t, triton.cdiv(C_out, blocks["BLOCK_CO"]), B)
    part_gbias = torch.empty(B * n_t, C_out, device=x.device, dtype=torch.float32)
    common = (C_out, C_in, T, stride, K, *x.stride(), *weight.stride(), *gy.stride())
    prec = _precision(x.dtype, x.device)
    dgamma = dbeta = None
    if norm == NORM_LAYER:
        s_gax = torch.empty(B * n_t, C_out, device=x.device, dtype=torch.float32)
        s_ga = torch.empty_like(s_gax)
        _fe_layer_bwd_norm_kernel[grid](x, weight, bias_arg, gamma_arg, beta_arg, gy, gz, stat0, stat1, s_gax, s_ga,
                                        part_gbias, 1.0, *common, NORM=_K_LAYER, PRECISION=prec, **blocks, **launch)
        dgamma, dbeta = s_gax.sum(0), s_ga.sum(0)
    elif norm == NORM_GROUP:
        s_ga = torch.empty(B * C_out, n_t, device=x.device, dtype=torch.float32)
        s_gax = torch.empty_like(s_ga)
        _fe_layer_bwd_norm_kernel[grid](x, weight, bias_arg, gamma_arg, beta_arg, gy, gz, stat0, stat1, s_ga, s_gax,
                                        part_gbias, 1.0 / T, *common, NORM=_GROUP_STATS, PRECISION=prec,
                                        **blocks, **launch)
        s_ga, s_gax = s_ga.sum(1), s_gax.sum(1)
        _fe_layer_bwd_norm_kernel[grid](x, weight, bias_arg, gamma_arg, beta_arg, gy, gz, stat0, stat1, s_ga, s_gax,
                                        part_gbias, 1.0 / T, *common, NORM=_GROUP_APPLY, PRECISION=prec,
                                        **blocks, **launch)
        dgamma, dbeta = s_gax.view(B, C_out).sum(0), s_ga.view(B, C_out).sum(0)
    else:
        _fe_layer_bwd_norm_kernel[grid](x, weight, bias_arg, gamma_arg, beta_arg, gy, gz, stat0, stat1, stat0, stat1,
                                        part_gbias, 1.0, *common, NORM=_K_NONE, PRECISION=prec, **blocks, **launch)
    dbias = part_gbias.sum(0)

    # dW: split the time axis so that small batches still fill the GPU.
    J = C_in * K
    wb, wl = _split(_bwd_weight_blocks(x.dtype))
    tiles = triton.cdiv(T, wb["BLOCK_T"])
    base_programs = triton.cdiv(J, wb["BLOCK_J"]) * triton.cdiv(C_out, wb["BLOCK_CO"]) * B
    if x.device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 8  # the interpreter: small, but still exercises the split path
    n_split = max(1, min(tiles, triton.cdiv(target, base_programs)))
    t_chunk = triton.cdiv(tiles, n_split) * wb["BLOCK_T"]
    n_split = triton.cdiv(T, t_chunk)
    part_gw = torch.empty(B * n_split, C_out, J, device=x.device, dtype=torch.float32)
    _conv_bwd_weight_kernel[(triton.cdiv(J, wb["BLOCK_J"]), triton.cdiv(C_out, wb["BLOCK_CO"]), B * n_split)](
        x, gz, part_gw, C_out, C_in, T, stride, K, t_chunk, n_split, *x.stride(),
        PRECISION=prec, **wb, **wl)
    dweight = part_gw.sum(0).view(C_out, C_in, K)

    dx = None
    if need_input_grad:
        ib, il = _split(_bwd_input_blocks(x.dtype))
        dx = torch.empty(B, C_in, L, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(triton.cdiv(L, stride), ib["BLOCK_Q"]), triton.cdiv(C_in, ib["BLOCK_CI"]), B * stride)
        _conv_bwd_input_kernel[grid](
            gz, weight, dx, C_out, C_in, L, T, stride, K, triton.cdiv(K, stride), *weight.stride(), *dx.stride(),
            PRECISION=prec, **ib, **il)
    return dx, dweight, dbias, dgamma, dbeta


# ---------------------------------------------------------------------------------------------- AOT
_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_variants() -> list[AotVariant]:
    """Every (kernel, dtype, constexprs, warps, stages) the GPU launchers above can pick."""
    out: list[AotVariant] = []
    for dtype, ty in _TL_DTYPES.items():
        p = f"*{ty}"
        prec = _precision(dtype)
        fwd_sig = {"X": p, "W": p, "Bias": p, "Gamma": p, "Beta": p, "Y": p, "Stat0": "*fp32", "Stat1": "*fp32",
                   "C_out": "i32", "C_in": "i32", "T_out": "i32", "conv_stride": "i32", "ksize": "i32", "eps": "fp32",
                   **{f"stride_{n}": "i32" for n in ("xb", "xc", "xl", "wo", "wi", "wk", "yb", "yc", "yl")}}
        bwd_sig = {"X": p, "W": p, "Bias": p, "Gamma": p, "Beta": p, "GY": p, "GZ": p, "Stat0": "*fp32",
                   "Stat1": "*fp32", "Sum0": "*fp32", "Sum1": "*fp32", "PartGBias": "*fp32", "inv_t": "fp32",
                   "C_out": "i32", "C_in": "i32", "T_out": "i32", "conv_stride": "i32", "ksize": "i32",
                   **{f"stride_{n}": "i32" for n in ("xb", "xc", "xl", "wo", "wi", "wk", "gyb", "gyc", "gyl")}}
        tiled = _for_dtype(_GPU_FWD_TILED, dtype)
        configs = [(_K_NONE, tiled), (_GROUP_STATS, tiled), (_GROUP_APPLY, tiled)]
        configs += [(_K_LAYER, _for_dtype(dict(BLOCK_CO=bco, **cfg), dtype)) for bco, cfg in _GPU_FWD_LAYER.items()]
        for norm, cfg in configs:
            for name, fn, sig, kcfg in (("fe_layer_fwd", _fe_layer_fwd_kernel, fwd_sig, cfg),
                                        ("fe_layer_bwd_norm", _fe_layer_bwd_norm_kernel, bwd_sig,
                                         _bwd_norm_cfg(cfg, norm == _K_LAYER, dtype))):
                kblocks, klaunch = _split(kcfg)
                ktag = f"{ty}_norm{norm}_co{kblocks['BLOCK_CO']}_t{kblocks['BLOCK_T']}_j{kblocks['BLOCK_J']}"
                constexprs = dict(NORM=norm, PRECISION=prec, **kblocks)
                out.append(AotVariant(f"{name}_{ktag}", fn, {**sig, **{k: "constexpr" for k in constexprs}},
                                      constexprs, **klaunch))
            blocks, launch = _split(cfg)
            tag = f"{ty}_norm{norm}_co{blocks['BLOCK_CO']}_t{blocks['BLOCK_T']}_j{blocks['BLOCK_J']}"
            # Beyond about 22 minutes of audio in one row, the 512-channel activations' batch strides pass
            # 2^31 and Triton specialises them as int64: the forward's variants for those (inference on
            # long audio; the int64 offsets inside the kernel are the same code either way).
            if norm == _K_NONE or norm in (_GROUP_STATS, _GROUP_APPLY) or blocks["BLOCK_CO"] == 512:
                constexprs = dict(NORM=norm, PRECISION=prec, **blocks)
                sig64 = {**fwd_sig, "stride_xb": "i64", "stride_yb": "i64", **{k: "constexpr" for k in constexprs}}
                out.append(AotVariant(f"fe_layer_fwd_{tag}_i64", _fe_layer_fwd_kernel, sig64, constexprs, **launch))
        wb, wl = _split(_gpu_bwd_blocks(_GPU_BWD_WEIGHT, _GPU_BWD_WEIGHT_FP32, dtype))
        sig = {"X": p, "GZ": p, "PartGW": "*fp32", "C_out": "i32", "C_in": "i32", "T_out": "i32",
               "conv_stride": "i32", "ksize": "i32", "t_chunk": "i32", "n_split": "i32",
               "stride_xb": "i32", "stride_xc": "i32", "stride_xl": "i32"}
        constexprs = dict(PRECISION=prec, **wb)
        out.append(AotVariant(f"conv_bwd_weight_{ty}", _conv_bwd_weight_kernel,
                              {**sig, **{k: "constexpr" for k in constexprs}}, constexprs, **wl))
        ib, il = _split(_gpu_bwd_blocks(_GPU_BWD_INPUT, _GPU_BWD_INPUT_FP32, dtype))
        sig = {"GZ": p, "W": p, "GX": p, "C_out": "i32", "C_in": "i32", "L_in": "i32", "T_out": "i32",
               "conv_stride": "i32", "ksize": "i32", "n_taps": "i32",
               **{f"stride_{n}": "i32" for n in ("wo", "wi", "wk", "gxb", "gxc", "gxl")}}
        constexprs = dict(PRECISION=prec, **ib)
        out.append(AotVariant(f"conv_bwd_input_{ty}", _conv_bwd_input_kernel,
                              {**sig, **{k: "constexpr" for k in constexprs}}, constexprs, **il))
    sblocks, slaunch = _split(_STATS_BLOCK)
    sig = {"PartMean": "*fp32", "PartM2": "*fp32", "Mean": "*fp32", "Rstd": "*fp32", "n_rows": "i32",
           "n_tiles": "i32", "T_out": "i32", "eps": "fp32", "TILE_T": "constexpr", "BLOCK_TILES": "constexpr"}
    out.append(AotVariant("group_stats", _group_stats_kernel, sig,
                          dict(TILE_T=_GPU_FWD_TILED["BLOCK_T"], **sblocks), **slaunch))
    return out
