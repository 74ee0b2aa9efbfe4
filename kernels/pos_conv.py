"""Triton kernels for the grouped positional convolution (``unispeech_fast.ops.pos_conv``).

Notation: ``x [B, T, H]`` channels-last, ``groups`` groups of ``C = H / groups`` channels, kernel
``K``, padding ``P = K // 2``; the conv output keeps frames ``[0, T)`` (for even K the extra frame is
dropped). The weight-normed weight ``W [H, C, K]`` is folded by the ops layer and packed per group as
a plain matrix ``Wp[g, k * C + ci, co] = W[g * C + co, ci, k]`` (shape ``[groups, K * C, C]``), so the
convolution is an implicit GEMM whose reduction index ``r = k * C + ci`` runs over ``R = K * C``:

    pre[b, t, g*C + co] = sum_r x[b, t + k(r) + OFFSET, g*C + ci(r)] * Wp[g, r, co]   (+ bias)

with ``OFFSET = -P`` and ``x`` read as zero outside ``[0, T)``. The same kernel computes the input
gradient with the transposed, tap-flipped weight ``WpT[g, k' * C + co, ci] = Wp[g, (K-1-k') * C + ci, co]``
and ``OFFSET = P - (K - 1)``. Launchers live in ``unispeech_fast/ops/pos_conv/triton.py``; the block table
they pick from is :data:`GPU_CONFIGS` / :data:`INTERPRETER_CONFIGS`, and :func:`aot_variants` lists
every GPU variant.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["GPU_CONFIGS", "INTERPRETER_CONFIGS", "DTYPE_NAMES", "aot_variants"]

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)

#: Triton pointer type names of the supported input dtypes (keys of the block tables).
DTYPE_NAMES: tuple[str, ...] = ("fp16", "bf16", "fp32")

#: Blocks per dtype on a GPU. ``conv``: (BLOCK_T, BLOCK_CO, BLOCK_R, num_warps, num_stages) for the
#: forward / input-gradient implicit GEMM (BLOCK_CO 64 holds the 48 or 64 channels of a real group;
#: the (k, ci) reduction is looped in BLOCK_R chunks). ``grad_weight``: (BLOCK_R, BLOCK_CO, BLOCK_T,
#: num_warps, num_stages). ``gelu_grad``: (BLOCK, num_warps). fp32 halves the reduction chunk to keep
#: the pipelined shared memory at the size of the 16-bit variants. The 16-bit conv uses 64 frames and 8
#: warps: with 128 frames and 4 warps it used 255 registers and spilled about 1.2 KB (ptxas, Triton 3.9,
#: sm_90); now 147 registers, no spill (``python -m unispeech_fast.kernels.aot`` reports both). The weight
#: gradient uses 8 warps: with 4 it spilled 120 B (16-bit, sm_90) and 152 B (fp32 IEEE, sm_80); with 8 at most
#: 194 registers and no spill on either arch.
GPU_CONFIGS: dict[str, dict[str, tuple[int, ...]]] = {
    "fp16": {"conv": (64, 64, 64, 8, 3), "grad_weight": (64, 64, 64, 8, 3), "gelu_grad": (1024, 4)},
    "bf16": {"conv": (64, 64, 64, 8, 3), "grad_weight": (64, 64, 64, 8, 3), "gelu_grad": (1024, 4)},
    "fp32": {"conv": (64, 64, 32, 4, 3), "grad_weight": (64, 64, 32, 8, 3), "gelu_grad": (1024, 4)},
}
#: Small blocks for the CPU interpreter (each program x loop iteration costs milliseconds there); they
#: also make test shapes cross block edges: several channel blocks, reduction chunks and time tiles.
INTERPRETER_CONFIGS: dict[str, tuple[int, ...]] = {
    "conv": (16, 16, 32, 1, 1),
    "grad_weight": (32, 16, 32, 1, 1),
    "gelu_grad": (256, 1),
}


@triton.jit
def _group_channels(C, BLOCK_CO: tl.constexpr):
    """Grid axis 1 is (group, channel block): ``(g, chan0, offs_co, mask_co)``, ``chan0 = g * C`` (int64) the group's
    first channel and ``offs_co`` the block's channels within the group (``mask_co``: those below ``C``)."""
    pid_gc = tl.program_id(1)
    n_co = tl.cdiv(C, BLOCK_CO)
    g = pid_gc // n_co
    offs_co = (pid_gc % n_co) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    return g, (g * C).to(tl.int64), offs_co, offs_co < C


@triton.jit
def _conv_kernel(
    X, Wp, Bias, Res, Out, Pre,
    T, C, R, OFFSET,
    stride_xb, stride_xt, stride_xh,
    stride_wg, stride_wr, stride_wc,
    stride_resb, stride_rest, stride_resh,
    stride_ob, stride_ot, stride_oh,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SAVE_PRE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grouped conv as an implicit GEMM with a fused bias, exact GELU and residual add.

    Forward (``OFFSET = -K//2``, ``Wp`` the packed weight, ``Res = X``)::

        pre[t, co] = bias[co] + sum_{k, ci} X[t + k + OFFSET, ci] * Wp[k*C + ci, co]
        Out[t, co] = Res[t, co] + gelu(pre[t, co]),   gelu(z) = z * Phi(z) = z/2 * (1 + erf(z / sqrt 2))

    (``Pre`` receives ``pre`` in fp32 when ``SAVE_PRE``.) Its VJP with respect to X is the same kernel
    run on ``X = grad_pre``, ``Wp = WpT`` (transposed, taps flipped), ``OFFSET = K//2 - (K-1)``,
    ``Res = grad_out``, no bias and no activation:
    ``grad_x[s, ci] = grad_out[s, ci] + sum_{k, co} grad_pre[s - k + K//2, co] * W[co, ci, k]``.

    Grid: (time tiles, groups x channel blocks, batch). Accumulation in fp32 with ``tl.dot``.
    """
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(2).to(tl.int64)
    g, chan0, offs_co, mask_co = _group_channels(C, BLOCK_CO)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T

    X_b = X + pid_b * stride_xb + chan0 * stride_xh
    Wp_g = Wp + g.to(tl.int64) * stride_wg
    acc = tl.zeros((BLOCK_T, BLOCK_CO), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        tap = offs_r // C
        ci = offs_r % C
        src_t = offs_t[:, None] + (tap + OFFSET)[None, :]
        mask_x = (src_t >= 0) & (src_t < T) & mask_r[None, :]
        xs = tl.load(
            X_b + src_t.to(tl.int64) * stride_xt + ci.to(tl.int64)[None, :] * stride_xh, mask=mask_x, other=0.0
        )
        ws = tl.load(
            Wp_g + offs_r.to(tl.int64)[:, None] * stride_wr + offs_co.to(tl.int64)[None, :] * stride_wc,
            mask=mask_r[:, None] & mask_co[None, :], other=0.0,
        )
        acc = tl.dot(xs, ws, acc, input_precision=DOT_PRECISION)

    chan = chan0 + offs_co.to(tl.int64)
    mask = mask_t[:, None] & mask_co[None, :]
    t64 = offs_t.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(Bias + chan, mask=mask_co, other=0.0).to(tl.float32)[None, :]
    out_off = pid_b * stride_ob + t64[:, None] * stride_ot + chan[None, :] * stride_oh
    if SAVE_PRE:
        tl.store(Pre + out_off, acc, mask=mask)
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT1_2))
    res = tl.load(Res + pid_b * stride_resb + t64[:, None] * stride_rest + chan[None, :] * stride_resh,
                  mask=mask, other=0.0)
    tl.store(Out + out_off, (acc + res.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_grad_kernel(GradOut, Pre, GradPre, N, BLOCK: tl.constexpr):
    """``grad_pre = grad_out * gelu'(pre)`` with ``gelu'(z) = Phi(z) + z * phi(z)`` (exact erf GELU).

    Elementwise over ``N`` contiguous elements; ``Pre`` is fp32, ``GradPre`` takes ``GradOut``'s dtype.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    z = tl.load(Pre + offs, mask=mask, other=0.0)
    dy = tl.load(GradOut + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(z * _SQRT1_2))
    pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    tl.store(GradPre + offs, (dy * (cdf + z * pdf)).to(GradPre.dtype.element_ty), mask=mask)


@triton.jit
def _grad_weight_kernel(
    X, GradPre, Partial,
    B, T, C, R, OFFSET, n_t_tiles, tiles_per_split,
    stride_xb, stride_xt, stride_xh,
    stride_gb, stride_gt, stride_gh,
    stride_ps, stride_pg, stride_pr, stride_pc,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Gradient of the packed weight, one split of the (batch, time) reduction per program.

    ``Partial[s, g, k*C + ci, co] = sum_{(b, t) in split s} X[b, t + k + OFFSET, g*C + ci] * GradPre[b, t, g*C + co]``
    (``OFFSET = -K//2``; X is zero outside ``[0, T)``), i.e. ``grad_Wp = sum_s Partial[s]`` and
    ``grad_W[g*C + co, ci, k] = grad_Wp[g, k*C + ci, co]``. Split s covers the ``tiles_per_split``
    consecutive (batch, time tile) pairs starting at ``s * tiles_per_split``; the launcher sums the
    splits in a fixed order (deterministic, see the launcher). Grid: (reduction blocks, groups x
    channel blocks, splits).
    """
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(2)
    g, chan0, offs_co, mask_co = _group_channels(C, BLOCK_CO)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    tap = offs_r // C
    ci = offs_r % C
    x_chan = (chan0 + ci.to(tl.int64)) * stride_xh
    g_chan = (chan0 + offs_co.to(tl.int64)) * stride_gh

    first = pid_s * tiles_per_split
    n_tiles = tl.minimum(tiles_per_split, B * n_t_tiles - first)  # the last split may be short

    acc = tl.zeros((BLOCK_R, BLOCK_CO), dtype=tl.float32)
    for i in range(0, n_tiles):
        tile = first + i
        b = (tile // n_t_tiles).to(tl.int64)
        offs_t = (tile % n_t_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        src_t = offs_t[None, :] + (tap + OFFSET)[:, None]
        mask_x = (src_t >= 0) & (src_t < T) & mask_r[:, None] & mask_t[None, :]
        xs = tl.load(X + b * stride_xb + src_t.to(tl.int64) * stride_xt + x_chan[:, None], mask=mask_x, other=0.0)
        gp = tl.load(GradPre + b * stride_gb + offs_t.to(tl.int64)[:, None] * stride_gt + g_chan[None, :],
                     mask=mask_t[:, None] & mask_co[None, :], other=0.0)
        acc = tl.dot(xs, gp, acc, input_precision=DOT_PRECISION)

    P_out = (Partial + pid_s.to(tl.int64) * stride_ps + g.to(tl.int64) * stride_pg
             + offs_r.to(tl.int64)[:, None] * stride_pr + offs_co.to(tl.int64)[None, :] * stride_pc)
    tl.store(P_out, acc, mask=mask_r[:, None] & mask_co[None, :])


def aot_variants():
    """Every GPU variant the launchers in ``unispeech_fast.ops.pos_conv`` can pick."""
    from .aot import AotVariant

    i32 = "i32"
    out = []
    for dt in DTYPE_NAMES:
        cfg = GPU_CONFIGS[dt]
        ptr = f"*{dt}"
        precisions = ("ieee", "tf32") if dt == "fp32" else ("ieee",)
        for prec in precisions:
            bt, bco, br, warps, stages = cfg["conv"]
            conv_sig = {
                "X": ptr, "Wp": ptr, "Bias": ptr, "Res": ptr, "Out": ptr, "Pre": "*fp32",
                "T": i32, "C": i32, "R": i32, "OFFSET": i32,
                **{f"stride_{t}{d}": i32 for t, dims in (("x", "bth"), ("w", "grc"), ("res", "bth"), ("o", "bth"))
                   for d in dims},
            }
            # forward (bias or not, pre saved for backward or not) and the input gradient
            modes = [(bias, True, save) for bias in (True, False) for save in (True, False)] + [(False, False, False)]
            for has_bias, gelu, save in modes:
                consts = {"HAS_BIAS": has_bias, "GELU": gelu, "SAVE_PRE": save, "DOT_PRECISION": prec,
                          "BLOCK_T": bt, "BLOCK_CO": bco, "BLOCK_R": br}
                sig = {**conv_sig, **{k: "constexpr" for k in consts}}
                name = f"pos_conv_conv_{dt}_{prec}_bias{int(has_bias)}_gelu{int(gelu)}_save{int(save)}"
                out.append(AotVariant(name, _conv_kernel, sig, consts, warps, stages))
            br_w, bco_w, bt_w, warps_w, stages_w = cfg["grad_weight"]
            consts = {"DOT_PRECISION": prec, "BLOCK_R": br_w, "BLOCK_CO": bco_w, "BLOCK_T": bt_w}
            sig = {
                "X": ptr, "GradPre": ptr, "Partial": "*fp32",
                "B": i32, "T": i32, "C": i32, "R": i32, "OFFSET": i32, "n_t_tiles": i32, "tiles_per_split": i32,
                **{f"stride_{t}{d}": i32 for t, dims in (("x", "bth"), ("g", "bth"), ("p", "sgrc")) for d in dims},
                **{k: "constexpr" for k in consts},
            }
            out.append(AotVariant(f"pos_conv_grad_weight_{dt}_{prec}", _grad_weight_kernel, sig, consts,
                                  warps_w, stages_w))
        block, warps = cfg["gelu_grad"]
        out.append(AotVariant(f"pos_conv_gelu_grad_{dt}", _gelu_grad_kernel,
                              {"GradOut": ptr, "Pre": "*fp32", "GradPre": ptr, "N": "i32", "BLOCK": "constexpr"},
                              {"BLOCK": block}, warps, 1))
    return out
