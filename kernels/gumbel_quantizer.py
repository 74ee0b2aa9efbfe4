"""Triton kernels of the Gumbel-softmax product vector quantizer (forward and backward).

Notation: ``N`` frames (rows), ``G`` groups, ``V`` codes per group, ``DG = D / G`` codevector width.
Logits are read as ``[N, G * V]`` (last dim contiguous), the codebook as fp32 ``[G * V, DG]``.
Every program owns one block of rows of one group ``g`` (grid ``(cdiv(N, rows per program), G)``);
all math is fp32 whatever the storage dtype.

Forward (:func:`_gumbel_fwd_kernel`), per row r and group g, with ``l = logits[r, g, :]``:

* training (``SAMPLE``): Gumbel noise ``n_v = -log(-log(u_v))`` with ``u = tl.rand(seed, offset)``
  (Philox; the offset is the element's flat index ``(r * G + g) * V + v``, so the noise of an element
  does not depend on the block sizes), or explicit noise read from memory (``EXPLICIT_NOISE``, tests);
  ``k = argmax_v(l + n)``; ``s = softmax((l + n) / tau)`` is stored (fp32 ``[N, G, V]``) for the
  backward; the marginal numerator ``sum_r softmax(l)`` (no noise) is accumulated;
* eval: ``k = argmax_v(l)``; the marginal numerator is the per-code count ``sum_r [k_r == v]``;
* both: ``quantized[r, g * DG:(g + 1) * DG] = codevectors[g * V + k]`` (a gather: the value of the
  straight-through one-hot is exactly 1 on ``k``), and ``k`` is stored for the backward.

Every row carries a weight ``w_r`` (fp32 ``RowWeight[N]``: 1, or 0/1 from the perplexity mask):
the marginal numerators sum ``w_r * p_r`` (training) or ``w_r * [k_r == v]`` (eval) and the
launcher divides by ``sum_r w_r``; the perplexity term of the backward is multiplied by ``w_r``.
With all weights 1 the results are bit for bit those of an unweighted sum.

Marginals are reduced deterministically: each program writes its fp32 partial sum ``[V]`` to
``Partial[pid_n, g]`` and the launcher sums the ``[cdiv(N, ROWS), G, V]`` partials with torch
(no atomics in the forward).

The uniform is clamped to ``[2**-32, 1 - 2**-24]`` before the double log: ``tl.rand`` returns
``[0, 1)``, and ``u = 0`` would give ``n = -inf`` while ``u`` rounding to 1 would give ``n = +inf``
(NaN in the softmax). The clamp bounds the noise to about ``[-3.1, 16.6]``; the lower clamp is
below Philox's smallest positive output (``2**-31``), so only ``u = 0`` exactly is moved, and the upper
clamp is the largest fp32 below 1, so no output of ``tl.rand`` is moved at all.

Backward. With ``gq = dL/dquantized[r, g]`` (``[DG]``) and ``gy_v = <gq, codevectors[g * V + v]>``:

* logits (training only, :func:`_gumbel_bwd_logits_kernel`): the straight-through estimator routes
  ``dL/dy = gy`` through ``s``: ``dL/dl_v = (s_v / tau) * (gy_v - sum_w s_w gy_w)``, plus the
  perplexity term. With ``m_gv = (1/N) sum_r p_rgv``, ``p = softmax(l)``,
  ``H_g = -sum_v m_gv log m_gv`` and ``P = sum_g exp(H_g)``:
  ``dP/dm_gv = -exp(H_g) (log m_gv + 1)``, so ``dL/dp_rgv = c_gv = gP * dP/dm_gv / N`` (the same for
  every row) and, through the softmax, ``dL/dl_rgv += p_rgv (c_gv - sum_w p_rgw c_gw)``. The
  launcher computes ``c`` (``[G, V]``, tiny) with torch. In eval the logits get no gradient.
* codevectors (:func:`_gumbel_bwd_codevectors_kernel`): ``dL/dcodevectors[g * V + k_r] += gq_r``
  (the one-hot's forward value is 1), a scatter-add with fp32 atomics, so the summation order of
  rows that chose the same code is not deterministic.
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from unispeech_fast.ops.gumbel_quantizer.common import MAX_CODES

__all__ = ["GumbelConfig", "CONFIGS", "pick_config", "MAX_CODES", "aot_variants"]


@dataclasses.dataclass(frozen=True)
class GumbelConfig:
    """Block sizes for one ``BLOCK_V`` (the padded number of codes per group)."""

    block_v: int
    rows_fwd: int  # rows per forward program (one fp32 marginal partial per program and group)
    block_n_fwd: int  # rows per forward iteration (the register tile is [block_n_fwd, block_v])
    block_n_bwd: int  # rows per backward program (>= 16: tl.dot)
    block_d_fwd: int
    block_d_bwd: int
    num_warps_fwd: int
    num_warps_bwd: int


#: The fixed launch table, keyed by ``BLOCK_V``. The forward keeps its register tile small (the
#: unrolled Philox rounds grow with it: compile time and registers) and loops over ``rows_fwd`` rows;
#: ``block_n_bwd >= 16`` and ``block_d_bwd >= 16`` because the backward runs ``tl.dot`` on
#: ``[block_n_bwd, block_d_bwd] x [block_d_bwd, BLOCK_V]`` tiles.
CONFIGS: dict[int, GumbelConfig] = {
    c.block_v: c
    for c in (
        GumbelConfig(32, 64, 32, 32, 64, 32, 4, 4),
        GumbelConfig(128, 64, 16, 32, 64, 32, 4, 8),  # backward on 4 warps: 68 B spilled (16-bit IEEE, sm_90)
        GumbelConfig(512, 64, 4, 16, 64, 16, 4, 8),  # UniSpeech: V = 320
    )
}
#: (``MAX_CODES``, imported above from ``unispeech_fast.ops.gumbel_quantizer.common``, is the largest number of
#: codes per group the table serves, the one limit the triton backend's reasons read too.)
#: Pipelining depth of every launch (the loops are short; deeper only costs shared memory).
NUM_STAGES = 2
#: Rows per program of the codevector scatter-add, and its DG chunk.
SCATTER_BLOCK_N = 32
SCATTER_BLOCK_D = 64
SCATTER_NUM_WARPS = 4


def pick_config(num_codes: int) -> GumbelConfig:
    """The smallest table entry with ``BLOCK_V >= num_codes`` (few entries keep the AOT list short)."""
    if not 1 <= num_codes <= MAX_CODES:
        raise ValueError(f"num_codes (V) must be in [1, {MAX_CODES}], got {num_codes}")
    return CONFIGS[min(b for b in CONFIGS if b >= num_codes)]


@triton.jit
def _gumbel_fwd_kernel(
    Logits, Noise, Seed, Codevectors, Out, Soft, Index, Partial, RowWeight,
    N, V, DG, stride_ln, stride_on, tau,
    SAMPLE: tl.constexpr, EXPLICIT_NOISE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward of one (row block, group); see the module docstring for the math.

    Logits ``[N, G*V]`` (row stride ``stride_ln``, unit column stride), Noise fp32 ``[N, G*V]``
    contiguous (read only if ``EXPLICIT_NOISE``), Seed int64 ``[1]`` (Philox seed, read only if
    ``SAMPLE and not EXPLICIT_NOISE``), Codevectors fp32 ``[G*V, DG]`` contiguous, Out ``[N, G*DG]``
    (row stride ``stride_on``), Soft fp32 ``[N, G, V]`` (written only if ``SAMPLE``), Index int32
    ``[N, G]``, Partial fp32 ``[cdiv(N, ROWS), G, V]``, RowWeight fp32 ``[N]`` (the marginal's row
    weights). A program owns ``ROWS`` rows, ``BLOCK_N`` at a time.
    """
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    num_groups = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_V)
    col_ok = cols < V
    col_idx = g * V + cols  # column of the [N, G*V] view
    partial = tl.zeros((BLOCK_V,), dtype=tl.float32)
    if SAMPLE and not EXPLICIT_NOISE:
        seed = tl.load(Seed)
    for r0 in range(0, ROWS, BLOCK_N):
        rows = pid_n * ROWS + r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        weight = tl.load(RowWeight + rows64, mask=row_ok, other=0.0)

        # Masked rows read 0 (finite), masked codes -inf (never chosen, zero probability).
        logit = tl.load(Logits + rows64[:, None] * stride_ln + col_idx[None, :], mask=mask, other=0.0).to(tl.float32)
        logit = tl.where(col_ok[None, :], logit, float("-inf"))
        flat = rows64[:, None] * (num_groups * V) + col_idx[None, :]  # element index in [N, G, V]

        if SAMPLE:
            if EXPLICIT_NOISE:
                noise = tl.load(Noise + flat, mask=mask, other=0.0).to(tl.float32)
            else:
                u = tl.rand(seed, flat.to(tl.int32))
                u = tl.minimum(tl.maximum(u, 2.3283064365386963e-10), 0.99999994039535522)  # [2^-32, 1 - 2^-24]
                noise = -tl.log(-tl.log(u))
            perturbed = logit + noise
            code = tl.argmax(perturbed, axis=1)
            scaled = perturbed / tau
            scaled = scaled - tl.max(scaled, axis=1)[:, None]
            e = tl.exp(scaled)
            soft = e / tl.sum(e, axis=1)[:, None]
            tl.store(Soft + flat, soft, mask=mask)
            # Marginal numerator: softmax of the noiseless logits, summed over the valid rows.
            shifted = logit - tl.max(logit, axis=1)[:, None]
            ep = tl.exp(shifted)
            prob = ep / tl.sum(ep, axis=1)[:, None]
            partial += tl.sum(tl.where(row_ok[:, None], prob, 0.0) * weight[:, None], axis=0)
        else:
            code = tl.argmax(logit, axis=1)
            hit = (cols[None, :] == code[:, None]) & row_ok[:, None]
            partial += tl.sum(hit.to(tl.float32) * weight[:, None], axis=0)
        tl.store(Index + rows64 * num_groups + g, code.to(tl.int32), mask=row_ok)

        # Gather the chosen codevector rows (no one-hot x codebook product).
        cv_row = (g * V + code).to(tl.int64)
        for d0 in range(0, DG, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dmask = row_ok[:, None] & (d < DG)[None, :]
            vec = tl.load(Codevectors + cv_row[:, None] * DG + d[None, :], mask=dmask, other=0.0)
            tl.store(Out + rows64[:, None] * stride_on + (g * DG + d)[None, :], vec.to(Out.dtype.element_ty),
                     mask=dmask)
    tl.store(Partial + (pid_n * num_groups + g).to(tl.int64) * V + cols, partial, mask=col_ok)


@triton.jit
def _gumbel_bwd_logits_kernel(
    GradOut, Codevectors, Soft, Logits, Coef, RowWeight, GradLogits,
    N, V, DG, stride_gn, stride_ln, stride_dn, tau,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient of the logits (training path) for one (row block, group).

    ``gy = gq @ codevectors[g]^T`` (fp32 ``tl.dot`` with ``input_precision=DOT_PRECISION``, ``"ieee"`` or
    ``"tf32"`` as the launcher's fp32 policy says, looped over DG), then
    ``dl = (s / tau) * (gy - <s, gy>) + p * (c - <p, c>)`` with ``p = softmax(l)`` recomputed from
    the logits, ``c = Coef[g]`` the perplexity coefficients (module docstring) and the second term
    multiplied by the row weight ``RowWeight[r]``.

    GradOut ``[N, G*DG]`` (row stride ``stride_gn``), Codevectors fp32 ``[G*V, DG]``, Soft fp32
    ``[N, G, V]``, Logits ``[N, G*V]`` (row stride ``stride_ln``), Coef fp32 ``[G, V]``, RowWeight
    fp32 ``[N]``, GradLogits ``[N, G*V]`` (row stride ``stride_dn``).
    """
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    num_groups = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    col_idx = g * V + cols
    cv_rows = col_idx.to(tl.int64)

    gy = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, DG, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DG
        gq = tl.load(GradOut + rows64[:, None] * stride_gn + (g * DG + d)[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        cv_t = tl.load(Codevectors + cv_rows[None, :] * DG + d[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        gy = tl.dot(gq, cv_t, acc=gy, input_precision=DOT_PRECISION)

    flat = rows64[:, None] * (num_groups * V) + col_idx[None, :]
    soft = tl.load(Soft + flat, mask=mask, other=0.0)
    grad = soft * (gy - tl.sum(soft * gy, axis=1)[:, None]) / tau

    logit = tl.load(Logits + rows64[:, None] * stride_ln + col_idx[None, :], mask=mask, other=0.0).to(tl.float32)
    logit = tl.where(col_ok[None, :], logit, float("-inf"))
    shifted = logit - tl.max(logit, axis=1)[:, None]
    ep = tl.exp(shifted)
    prob = ep / tl.sum(ep, axis=1)[:, None]
    coef = tl.load(Coef + col_idx, mask=col_ok, other=0.0)
    weight = tl.load(RowWeight + rows64, mask=row_ok, other=0.0)
    grad += (prob * (coef[None, :] - tl.sum(prob * coef[None, :], axis=1)[:, None])) * weight[:, None]

    tl.store(GradLogits + rows64[:, None] * stride_dn + col_idx[None, :], grad.to(GradLogits.dtype.element_ty), mask=mask)


@triton.jit
def _gumbel_bwd_codevectors_kernel(
    GradOut, Index, GradCodevectors,
    N, V, DG, stride_gn,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``GradCodevectors[g*V + k_r] += GradOut[r, g*DG:(g+1)*DG]`` for the rows of one block.

    GradOut ``[N, G*DG]`` (row stride ``stride_gn``), Index int32 ``[N, G]``, GradCodevectors fp32
    ``[G*V, DG]`` contiguous, zero-initialised; fp32 atomics (order of equal-code rows not fixed).
    """
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    num_groups = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    code = tl.load(Index + rows64 * num_groups + g, mask=row_ok, other=0)
    cv_row = (g * V + code).to(tl.int64)
    for d0 in range(0, DG, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = row_ok[:, None] & (d < DG)[None, :]
        gq = tl.load(GradOut + rows64[:, None] * stride_gn + (g * DG + d)[None, :], mask=dmask, other=0.0)
        tl.atomic_add(GradCodevectors + cv_row[:, None] * DG + d[None, :], gq.to(tl.float32), mask=dmask)


# ------------------------------------------------------------------------------------------------ AOT
#: (logits dtype, output dtype) pairs a launch can see: the output is promote(logits, codevectors),
#: which is the logits dtype or fp32 (fp16 logits with bf16 codevectors also give fp32).
DTYPE_PAIRS: tuple[tuple[str, str], ...] = (
    ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32"),
)
#: ``input_precision`` of the backward's fp32 dot: the launcher follows ``fp32_dot_precision``
#: (``unispeech_fast/ops/_triton_common.py``), so both can be launched.
DOT_PRECISIONS: tuple[str, ...] = ("ieee", "tf32")
#: Forward modes: (SAMPLE, EXPLICIT_NOISE).
FWD_MODES: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (True, True))


def aot_variants():
    """Every (kernel, dtypes, constexprs, warps) combination the launchers can pick on a GPU."""
    from .aot import AotVariant

    out = []
    for cfg in CONFIGS.values():
        for ldt, odt in DTYPE_PAIRS:
            for sample, explicit in FWD_MODES:
                sig = {
                    "Logits": f"*{ldt}", "Noise": "*fp32", "Seed": "*i64", "Codevectors": "*fp32", "Out": f"*{odt}",
                    "Soft": "*fp32", "Index": "*i32", "Partial": "*fp32", "RowWeight": "*fp32", "N": "i32",
                    "V": "i32", "DG": "i32",
                    "stride_ln": "i32", "stride_on": "i32", "tau": "fp32", "SAMPLE": "constexpr",
                    "EXPLICIT_NOISE": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
                    "BLOCK_D": "constexpr",
                }
                consts = {"SAMPLE": sample, "EXPLICIT_NOISE": explicit, "ROWS": cfg.rows_fwd,
                          "BLOCK_N": cfg.block_n_fwd, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d_fwd}
                mode = "eval" if not sample else ("noise" if explicit else "philox")
                out.append(AotVariant(f"gumbel_fwd_{mode}_{ldt}_{odt}_v{cfg.block_v}", _gumbel_fwd_kernel, sig,
                                      consts, cfg.num_warps_fwd, NUM_STAGES))
            sig = {
                "GradOut": f"*{odt}", "Codevectors": "*fp32", "Soft": "*fp32", "Logits": f"*{ldt}", "Coef": "*fp32",
                "RowWeight": "*fp32", "GradLogits": f"*{ldt}", "N": "i32", "V": "i32", "DG": "i32",
                "stride_gn": "i32", "stride_ln": "i32", "stride_dn": "i32", "tau": "fp32", "DOT_PRECISION": "constexpr",
                "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_D": "constexpr",
            }
            for prec in DOT_PRECISIONS:
                consts = {"DOT_PRECISION": prec, "BLOCK_N": cfg.block_n_bwd, "BLOCK_V": cfg.block_v,
                          "BLOCK_D": cfg.block_d_bwd}
                out.append(AotVariant(f"gumbel_bwd_logits_{ldt}_{odt}_v{cfg.block_v}_{prec}", _gumbel_bwd_logits_kernel,
                                      sig, consts, cfg.num_warps_bwd, NUM_STAGES))
    for odt in ("fp16", "bf16", "fp32"):
        sig = {"GradOut": f"*{odt}", "Index": "*i32", "GradCodevectors": "*fp32", "N": "i32", "V": "i32", "DG": "i32",
               "stride_gn": "i32", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
        consts = {"BLOCK_N": SCATTER_BLOCK_N, "BLOCK_D": SCATTER_BLOCK_D}
        out.append(AotVariant(f"gumbel_bwd_codevectors_{odt}", _gumbel_bwd_codevectors_kernel, sig, consts,
                              SCATTER_NUM_WARPS, NUM_STAGES))
    return out
