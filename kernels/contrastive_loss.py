"""Triton kernels of the fused contrastive (InfoNCE) loss, forward and backward.

Notation: ``N`` frames (the flattened ``B*T`` axis), ``D`` feature width, ``M`` masked rows, ``K``
negatives per row. Inputs: predictions ``c`` and targets ``t`` ``[N, D]`` (unit column stride,
row stride ``D``), ``Rows`` int64 ``[M]`` (the masked frames, distinct), ``Neg`` int64 ``[M, K]``
(rows of ``t``), optional ``Codes`` int64 ``[N, G]``, and the clamped norms ``max(|c_i|, eps)``,
``max(|t_j|, eps)`` (fp32 ``[N]``, computed by the launcher; the kernels divide by them, so that a
unit-direction input normalises exactly, e.g. at D = 1).
A program owns ``BLOCK_M`` masked rows and the whole feature axis (``BLOCK_D >= D``); all math in fp32.

Forward (:func:`_contrastive_fwd_kernel`), row ``r`` with frame ``i = Rows[r]``,
``chat = c_i / max(|c_i|, eps)``: ``s_0 = <chat, t_i> / max(|t_i|, eps) / tau``, and for each
negative ``j = Neg[r, k]`` ``s_k = <chat, t_j> / max(|t_j|, eps) / tau``, or ``-inf`` when ``j``
"equals" ``i`` (same code in every group with ``HAS_CODES``, else ``t_j == t_i`` in every element).
An online logsumexp over ``k`` gives ``lse``; ``RowLoss[r] = lse - s_0``, ``Lse[r] = lse``. The
negatives are read in place: nothing of size ``M * K * D`` is stored.

Backward (:func:`_contrastive_bwd_kernel`), with ``a_k = exp(s_k - lse) - [k == 0]`` (the softmax
minus the one-hot of the positive): ``V[r] = sum_k a_k t_{j_k} / max(|t_{j_k}|, eps)`` (stored per
row) and ``U[j] += a_k chat_i`` for every candidate (fp32 atomics: the order of rows that share a
candidate is not fixed). The launcher finishes with the VJP of the normalisation,
``grad_c_i = g / tau * (V - chat <chat, V>) / |c_i|`` and ``grad_t_j = g / tau * (U - that <that, U>) / |t_j|``
(``V / eps`` and ``U / eps`` where a norm was clamped).
"""

from __future__ import annotations

import triton
import triton.language as tl

from unispeech_fast.ops.contrastive_loss.common import MAX_D  # the one source, shared with the backend's reasons

__all__ = ["MAX_D", "BLOCK_DS", "ROWS_AND_WARPS", "block_d", "launch_config", "aot_variants"]

#: The feature blocks the launcher picks from (each one an AOT variant).
BLOCK_DS = (64, 256, 1024)
#: Masked rows per program (``BLOCK_M``) and warps, by feature block: one table for the launcher and the AOT
#: variants. With 16 rows and 4 warps the 1024-wide block's kernels spilled 0.2-11 KB (ptxas, Triton 3.9, sm_80
#: and sm_90; 8 rows and 8 warps: at most 32 B) and the 256-wide backward with codes 84 B on sm_90 (8 warps: none).
ROWS_AND_WARPS: dict[int, tuple[int, int]] = {64: (16, 4), 256: (16, 8), 1024: (8, 8)}
#: Pipelining depth of every launch.
NUM_STAGES = 1


def block_d(dim: int) -> int:
    """The smallest of :data:`BLOCK_DS` that holds ``dim`` features."""
    if not 1 <= dim <= MAX_D:
        raise ValueError(f"the feature width D must be in [1, {MAX_D}], got {dim}")
    return min(b for b in BLOCK_DS if b >= dim)


def launch_config(dim: int) -> dict:
    """``BLOCK_M``, ``BLOCK_D``, ``num_warps`` and ``num_stages`` of a launch over ``dim`` features."""
    bd = block_d(dim)
    rows, warps = ROWS_AND_WARPS[bd]
    return dict(BLOCK_M=rows, BLOCK_D=bd, num_warps=warps, num_stages=NUM_STAGES)


@triton.jit
def _same(i, j, t_pos, t, Codes, G, row_ok, tile_ok, HAS_CODES: tl.constexpr):
    """Per row: does candidate ``j`` equal the positive ``i`` (codes, else every element)?"""
    if HAS_CODES:
        eq = row_ok
        for g in range(0, G):
            ci = tl.load(Codes + i * G + g, mask=row_ok, other=0)
            cj = tl.load(Codes + j * G + g, mask=row_ok, other=0)
            eq = eq & (ci == cj)
    else:
        eq = tl.sum(tl.where(tile_ok & (t != t_pos), 1, 0), axis=1) == 0
    return eq


@triton.jit
def _masked_rows(Pred, Rows, PredNorm, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's ``BLOCK_M`` masked rows, shared by both kernels: their index ``r`` (int64), the row and tile
    masks, the feature columns, the frame ``i = Rows[r]`` and the normalised prediction ``chat`` (fp32)."""
    pid = tl.program_id(0)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < M
    r64 = r.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (cols < D)[None, :]
    i = tl.load(Rows + r64, mask=row_ok, other=0).to(tl.int64)
    chat = tl.load(Pred + i[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    chat = chat / tl.load(PredNorm + i, mask=row_ok, other=1.0)[:, None]
    return r64, row_ok, cols, tile_ok, i, chat


@triton.jit
def _contrastive_fwd_kernel(
    Pred, Targ, Rows, Neg, Codes, PredNorm, TargNorm, Lse, RowLoss,
    M, K, D, G, inv_tau,
    HAS_CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward of ``BLOCK_M`` masked rows (module docstring). Lse, RowLoss fp32 ``[M]``."""
    r64, row_ok, cols, tile_ok, i, chat = _masked_rows(Pred, Rows, PredNorm, M, D, BLOCK_M, BLOCK_D)
    t_pos = tl.load(Targ + i[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    s0 = tl.sum(chat * t_pos, axis=1) / tl.load(TargNorm + i, mask=row_ok, other=1.0) * inv_tau
    run_max = s0
    run_sum = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    for k in range(0, K):
        j = tl.load(Neg + r64 * K + k, mask=row_ok, other=0).to(tl.int64)
        t = tl.load(Targ + j[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        s = tl.sum(chat * t, axis=1) / tl.load(TargNorm + j, mask=row_ok, other=1.0) * inv_tau
        s = tl.where(_same(i, j, t_pos, t, Codes, G, row_ok, tile_ok, HAS_CODES), float("-inf"), s)
        new_max = tl.maximum(run_max, s)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(s - new_max)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(Lse + r64, lse, mask=row_ok)
    tl.store(RowLoss + r64, lse - s0, mask=row_ok)


@triton.jit
def _contrastive_bwd_kernel(
    Pred, Targ, Rows, Neg, Codes, PredNorm, TargNorm, Lse, V, U,
    M, K, D, G, inv_tau,
    HAS_CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of ``BLOCK_M`` masked rows: V fp32 ``[M, D]`` (stored), U fp32 ``[N, D]`` (atomic adds)."""
    r64, row_ok, cols, tile_ok, i, chat = _masked_rows(Pred, Rows, PredNorm, M, D, BLOCK_M, BLOCK_D)
    lse = tl.load(Lse + r64, mask=row_ok, other=0.0)
    t_pos = tl.load(Targ + i[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    norm_pos = tl.load(TargNorm + i, mask=row_ok, other=1.0)
    s0 = tl.sum(chat * t_pos, axis=1) / norm_pos * inv_tau
    a0 = tl.where(row_ok, tl.exp(s0 - lse) - 1.0, 0.0)
    v = (a0 / norm_pos)[:, None] * t_pos
    tl.atomic_add(U + i[:, None] * D + cols[None, :], a0[:, None] * chat, mask=tile_ok)
    for k in range(0, K):
        j = tl.load(Neg + r64 * K + k, mask=row_ok, other=0).to(tl.int64)
        t = tl.load(Targ + j[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        norm_t = tl.load(TargNorm + j, mask=row_ok, other=1.0)
        s = tl.sum(chat * t, axis=1) / norm_t * inv_tau
        excluded = _same(i, j, t_pos, t, Codes, G, row_ok, tile_ok, HAS_CODES)
        a = tl.where(excluded | (~row_ok), 0.0, tl.exp(s - lse))
        v += (a / norm_t)[:, None] * t
        tl.atomic_add(U + j[:, None] * D + cols[None, :], a[:, None] * chat, mask=tile_ok)
    tl.store(V + r64[:, None] * D + cols[None, :], v, mask=tile_ok)


# ------------------------------------------------------------------------------------------------ AOT
def aot_variants():
    """Every (kernel, dtype, constexprs) combination the launcher can pick on a GPU."""
    from .aot import AotVariant

    out = []
    for dt in ("fp16", "bf16", "fp32"):
        for has_codes in (False, True):
            for bd in BLOCK_DS:
                common = {"Pred": f"*{dt}", "Targ": f"*{dt}", "Rows": "*i64", "Neg": "*i64", "Codes": "*i64",
                          "PredNorm": "*fp32", "TargNorm": "*fp32", "Lse": "*fp32"}
                scalars = {"M": "i32", "K": "i32", "D": "i32", "G": "i32", "inv_tau": "fp32",
                           "HAS_CODES": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}
                cfg = launch_config(bd)
                consts = {"HAS_CODES": has_codes, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_D": bd}
                tag = f"{dt}_{'codes' if has_codes else 'values'}_d{bd}"
                out.append(AotVariant(f"contrastive_fwd_{tag}", _contrastive_fwd_kernel,
                                      {**common, "RowLoss": "*fp32", **scalars}, consts, cfg["num_warps"],
                                      cfg["num_stages"]))
                out.append(AotVariant(f"contrastive_bwd_{tag}", _contrastive_bwd_kernel,
                                      {**common, "V": "*fp32", "U": "*fp32", **scalars}, consts, cfg["num_warps"],
                                      cfg["num_stages"]))
    return out
