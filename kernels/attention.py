"""Flash attention (forward and backward) for ``[batch, frames, heads, head_dim]`` tensors.

Notation, per (batch b, head h): ``S = scale * Q K^T`` with keys ``j >= L_b`` masked to ``-inf``
(``L_b`` the valid length of batch row b; key padding is right padding), ``P = softmax_rows(S)``,
``m_h`` the head mask, ``Z_ij`` the dropout keep mask (1 with probability ``1 - p``), and
``f = m_h / (1 - p)``. The op computes ``O = (f * Z o P) V`` (``o`` the elementwise product).

Forward (online softmax, fp32 accumulators, never materialising N x N): per query block, one pass
over the valid key blocks keeps the running row max ``mu``, the running denominator ``l`` and the
unnormalised accumulator; it stores ``O`` and the row log-sum-exp ``lse = mu + log(l)``.

Backward (FA2 style). With ``Pd = f * Z o P`` and ``dO`` the output gradient:
``dV = Pd^T dO``, ``dP = f * Z o (dO V^T)``, ``delta_i = sum_j P_ij dP_ij`` (``= rowsum(dO o O)_i``),
``dS = P o (dP - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``. ``P`` is recomputed from
``lse`` and ``Z`` is regenerated from the same Philox key. A batch row without valid keys (``L_b = 0``) uses
``L_b = N`` and scale 0 (uniform attention, zero dQ/dK), which is the reference's value. Three launches: ``_attn_bwd_rows`` with
``COMPUTE_DQ=False`` computes ``delta`` per query block from the recomputed ``P`` and ``dP`` (not
from the rounded ``O``; see its docstring), ``_attn_bwd_dkdv`` computes dK/dV per key block, and
``_attn_bwd_rows`` with ``COMPUTE_DQ=True`` computes dQ per query block.

dQ has its own pass (one program per query block, looping over key blocks) rather than atomics from
the dK/dV kernel: that keeps dQ deterministic, needs no fp32 scratch buffer and no extra cast
kernel, writes fp16/bf16 directly, and behaves the same under the interpreter. The price is
recomputing ``Q K^T``, ``dO V^T`` and the dropout mask once more.

Dropout uses ``tl.rand(seed + b * heads + h, i * N + j)``: the Philox key is the per-call seed
offset by the (batch, head) index and the counter is the (query, key) position, so the backward
regenerates the forward's mask exactly and the mask does not depend on the block sizes. The seed is
read from device memory (an int64 tensor drawn from torch's generator), so no host sync is needed.

The launchers live in ``unispeech_fast/ops/attention/triton.py``; this module only holds the kernels, the
block-size table the launchers use and :func:`aot_variants`.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

__all__ = ["BLOCK_DS", "DTYPES", "KERNEL_CONFIGS", "INTERPRETER_CONFIG", "block_d_for", "config_for", "aot_variants"]

_LOG2E = tl.constexpr(1.4426950408889634)

#: Supported element types (torch dtype names) and head-dim blocks. Head dims up to 64 use the 64
#: block, larger ones (up to 128) the 128 block; the extra columns are masked.
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
BLOCK_DS: tuple[int, ...] = (64, 128)

#: Launch settings per (dtype, BLOCK_D) and kernel, as (BLOCK_M, BLOCK_N, num_warps, num_stages).
#: ``fwd`` and ``bwd_q`` keep BLOCK_M queries resident and loop over BLOCK_N keys; ``bwd_kv`` keeps
#: BLOCK_N keys resident and loops over BLOCK_M queries; ``bwd_pre`` (delta) is shaped like ``bwd_q``. fp32 uses
#: smaller blocks (twice the bytes per element, and ieee-precision dots, which run on CUDA cores and hold their
#: operands in registers). Chosen not to spill registers on sm_80 or sm_90 (ptxas, Triton 3.9;
#: ``python -m unispeech_fast.kernels.aot`` reports registers and spills): 16-bit ``bwd_kv`` at head dim 64 with
#: 128 keys per block used 255 registers and spilled 512 bytes on sm_90 (64 keys: 243, none); with 4 warps the
#: 16-bit head-dim-64 forward, delta and dQ kernels spilled 108-432 B on sm_80 (8 warps: none), the 16-bit
#: head-dim-128 forward with 64 keys per block 116-152 B (32 keys: at most 16 B), its dK/dV and dQ kernels with
#: 4 warps and 64 keys or queries 160-750 B on sm_90 (32 and 8 warps: none); every fp32 kernel with 4 warps
#: spilled, 0.1-17 KB (8 warps: none; the head-dim-128 delta pass also needs 16 keys per block, 0.6 KB with 32).
_HALF_64 = {"fwd": (128, 64, 8, 3), "bwd_pre": (128, 64, 8, 3), "bwd_kv": (32, 64, 4, 3), "bwd_q": (128, 32, 8, 3)}
_HALF_128 = {"fwd": (128, 32, 8, 3), "bwd_pre": (128, 64, 8, 3), "bwd_kv": (32, 32, 8, 2), "bwd_q": (32, 32, 8, 2)}
_FP32_64 = {"fwd": (64, 32, 8, 2), "bwd_pre": (64, 32, 8, 2), "bwd_kv": (32, 64, 8, 2), "bwd_q": (64, 32, 8, 2)}
_FP32_128 = {"fwd": (64, 16, 8, 2), "bwd_pre": (64, 16, 8, 2), "bwd_kv": (32, 32, 8, 2), "bwd_q": (32, 32, 8, 2)}
KERNEL_CONFIGS: dict[tuple[str, int], dict[str, tuple[int, int, int, int]]] = {
    ("float16", 64): _HALF_64,
    ("float16", 128): _HALF_128,
    ("bfloat16", 64): _HALF_64,
    ("bfloat16", 128): _HALF_128,
    ("float32", 64): _FP32_64,
    ("float32", 128): _FP32_128,
}
#: Under the interpreter (CPU tensors) every kernel uses small blocks: the cost is per program and
#: loop iteration, and small blocks exercise the multi-block paths at test sizes.
INTERPRETER_CONFIG: dict[str, tuple[int, int, int, int]] = {k: (16, 16, 1, 1) for k in _HALF_64}


def block_d_for(head_dim: int) -> int:
    """The head-dim block for ``head_dim`` (1..128)."""
    if not 1 <= head_dim <= BLOCK_DS[-1]:
        raise ValueError(f"head_dim must be in 1..{BLOCK_DS[-1]}, got {head_dim}")
    return next(b for b in BLOCK_DS if head_dim <= b)


def config_for(dtype: str, head_dim: int, kernel: str, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``kernel`` on ``dtype`` / ``head_dim``."""
    if interpret:
        return INTERPRETER_CONFIG[kernel]
    return KERNEL_CONFIGS[(dtype, block_d_for(head_dim))][kernel]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with an fp32 result; fp32 operands use ieee precision (no TF32) when IEEE."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _row_length_and_scale(Lengths, b, seq_len, sm_scale):
    """``(L, scale)`` for batch row ``b``. A row with no valid key (``L_b = 0``) attends to all ``N`` keys
    uniformly with zero gradients for Q and K, as the reference (``masked_fill`` with the dtype's min on
    every key) does: ``L = N`` and score scale 0. Dispatch refuses such rows, but under torch.compile its
    data-dependent check does not run, and ``L = 0`` would otherwise give ``O = 0 / 0``."""
    length = tl.load(Lengths + b)
    empty = length == 0
    return tl.where(empty, seq_len, length), tl.where(empty, 0.0, sm_scale)


@triton.jit
def _batch_head(Lengths, n_heads, seq_len, sm_scale):
    """``(pid_bh, b, h, L, scale)`` of this program: grid axis 1 is ``b * heads + h`` (``b``, ``h`` int64), and
    ``L``, ``scale`` are :func:`_row_length_and_scale` of row ``b``."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    length, sm_scale = _row_length_and_scale(Lengths, b, seq_len, sm_scale)
    return pid_bh, b, h, length, sm_scale


@triton.jit
def _block(start, limit, BLOCK: tl.constexpr):
    """``(idx, ok, idx64)``: the indices ``start .. start + BLOCK - 1``, which are below ``limit``, and the indices
    as int64 (to multiply by strides)."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < limit, idx.to(tl.int64)


@triton.jit
def _keep(seed_bh, offsets, dropout_p):
    """Dropout keep mask ``Z`` (True = kept) at Philox counters ``offsets = query * N + key``."""
    return tl.rand(seed_bh, offsets) >= dropout_p


@triton.jit
def _load_tile(Base, idx, stride_t, offs_d, idx_ok, d_ok):
    """The ``[len(idx), BLOCK_D]`` tile of frames ``idx`` (int64) of one (batch, head); zeros where masked."""
    return tl.load(Base + idx[:, None] * stride_t + offs_d[None, :], mask=idx_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _store_tile(Base, idx, stride_t, offs_d, idx_ok, d_ok, value):
    """Store ``value`` (cast to ``Base``'s type) as the tile of frames ``idx`` (int64); the inverse of :func:`_load_tile`."""
    tl.store(Base + idx[:, None] * stride_t + offs_d[None, :], value.to(Base.dtype.element_ty),
             mask=idx_ok[:, None] & d_ok[None, :])


@triton.jit
def _prob_factor(HeadMask, Seed, h, pid_bh, dropout_p, HAS_HEAD_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """``(f, seed_bh)``: the factor ``m_h / (1 - p)`` on the kept probabilities and the Philox key."""
    f = 1.0
    seed_bh = 0
    if HAS_HEAD_MASK:
        f = f * tl.load(HeadMask + h)
    if HAS_DROPOUT:
        f = f / (1.0 - dropout_p)
        seed_bh = tl.load(Seed) + pid_bh
    return f, seed_bh


@triton.jit
def _p_dp(q, do, k, v, lse2, qk_scale, f, rows, cols, col_ok, seq_len, seed_bh, dropout_p,
          HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr):
    """For a (query block, key block) tile: ``P = 2^(scale log2(e) q k^T - lse2)`` (zero on padded
    keys) and ``dP = f * Z o (dO v^T)``."""
    p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse2[:, None])
    p = tl.where(col_ok[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), IEEE) * f
    if HAS_DROPOUT:
        dp = tl.where(_keep(seed_bh, rows[:, None] * seq_len + cols[None, :], dropout_p), dp, 0.0)
    return p, dp


@triton.jit
def _attn_fwd(
    Q, K, V, O, Lse, Lengths, HeadMask, Seed,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    n_heads, seq_len, head_dim,
    sm_scale, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_HEAD_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
):
    """Forward: ``O = (f * Z o softmax(scale * Q K^T + mask)) V`` and ``lse`` (natural log) per row.

    Grid ``(cdiv(N, BLOCK_M), batch * heads)``. Online softmax in base 2: with ``s = scale * log2(e) *
    q.k``, ``mu' = max(mu, max_j s_j)``, ``l' = l * 2^(mu - mu') + sum_j 2^(s_j - mu')``,
    ``acc' = acc * 2^(mu - mu') + (Z o 2^(s - mu')) V``; at the end ``O = f * acc / l``. Key blocks
    at or beyond the row's valid length are never visited; the partial block is masked.
    ``Lse`` is fp32 ``[batch, heads, N]`` contiguous.
    """
    pid_bh, b, h, length, sm_scale = _batch_head(Lengths, n_heads, seq_len, sm_scale)
    rows, row_ok, rows64 = _block(tl.program_id(0) * BLOCK_M, seq_len, BLOCK_M)
    offs_d, d_ok, _ = _block(0, head_dim, BLOCK_D)

    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows64, stride_qt, offs_d, row_ok, d_ok)
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * _LOG2E
    f, seed_bh = _prob_factor(HeadMask, Seed, h, pid_bh, dropout_p, HAS_HEAD_MASK, HAS_DROPOUT)

    mu = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        cols, col_ok, cols64 = _block(start_n, length, BLOCK_N)
        k = _load_tile(K_base, cols64, stride_kt, offs_d, col_ok, d_ok)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        mu_new = tl.maximum(mu, tl.max(s, 1))
        alpha = tl.exp2(mu - mu_new)
        p = tl.exp2(s - mu_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = tl.where(_keep(seed_bh, rows[:, None] * seq_len + cols[None, :], dropout_p), p, 0.0)
        v = _load_tile(V_base, cols64, stride_vt, offs_d, col_ok, d_ok)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        mu = mu_new

    out = acc * (f / l_i)[:, None]
    _store_tile(O + b * stride_ob + h * stride_oh, rows64, stride_ot, offs_d, row_ok, d_ok, out)
    lse = (mu + tl.log2(l_i)) / _LOG2E
    tl.store(Lse + pid_bh.to(tl.int64) * seq_len + rows64, lse, mask=row_ok)


@triton.jit
def _attn_bwd_rows(
    Q, K, V, DO, Lse, Delta, DQ, Lengths, HeadMask, Seed,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    n_heads, seq_len, head_dim,
    sm_scale, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_HEAD_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr, COMPUTE_DQ: tl.constexpr,
):
    """Backward work per block of BLOCK_M queries, one pass over the valid key blocks.

    ``COMPUTE_DQ=False`` (the preprocess): ``delta_i = sum_j P_ij dP_ij`` with ``dP = f * Z o (dO
    V^T)``, stored fp32 ``[batch, heads, N]``. Mathematically ``delta = rowsum(dO o O)``, but that
    form reads ``O`` rounded to fp16/bf16: for a row with few valid keys (``P_ij`` near 1) the
    rounding error of ``O`` goes straight into ``dS = P o (dP - delta)`` and ``dK`` (measured: 4x
    the eager error for a length-1 row in fp16). Recomputing ``P`` and ``dP`` costs two extra
    ``N x N x D`` products per head and makes ``delta`` consistent, in fp32, with the ``P`` and
    ``dP`` the other kernels use.

    ``COMPUTE_DQ=True`` (after the preprocess): ``dQ = scale * (P o (dP - delta)) K``.
    Grid ``(cdiv(N, BLOCK_M), batch * heads)``.
    """
    pid_bh, b, h, length, sm_scale = _batch_head(Lengths, n_heads, seq_len, sm_scale)
    rows, row_ok, rows64 = _block(tl.program_id(0) * BLOCK_M, seq_len, BLOCK_M)
    offs_d, d_ok, _ = _block(0, head_dim, BLOCK_D)

    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows64, stride_qt, offs_d, row_ok, d_ok)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, rows64, stride_dot, offs_d, row_ok, d_ok)
    lse2 = tl.load(Lse + pid_bh.to(tl.int64) * seq_len + rows64, mask=row_ok, other=0.0) * _LOG2E
    Delta_rows = Delta + pid_bh.to(tl.int64) * seq_len + rows64
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * _LOG2E
    f, seed_bh = _prob_factor(HeadMask, Seed, h, pid_bh, dropout_p, HAS_HEAD_MASK, HAS_DROPOUT)

    if COMPUTE_DQ:
        delta = tl.load(Delta_rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    else:
        delta = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        cols, col_ok, cols64 = _block(start_n, length, BLOCK_N)
        k = _load_tile(K_base, cols64, stride_kt, offs_d, col_ok, d_ok)
        v = _load_tile(V_base, cols64, stride_vt, offs_d, col_ok, d_ok)
        p, dp = _p_dp(q, do, k, v, lse2, qk_scale, f, rows, cols, col_ok, seq_len, seed_bh, dropout_p,
                      HAS_DROPOUT, IEEE)
        if COMPUTE_DQ:
            dq += _dot((p * (dp - delta[:, None])).to(k.dtype), k, IEEE)
        else:
            delta += tl.sum(p * dp, 1)
    if COMPUTE_DQ:
        dq = dq * sm_scale
        _store_tile(DQ + b * stride_dqb + h * stride_dqh, rows64, stride_dqt, offs_d, row_ok, d_ok, dq)
    else:
        tl.store(Delta_rows, delta, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, Lse, Delta, Lengths, HeadMask, Seed,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    n_heads, seq_len, head_dim,
    sm_scale, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_HEAD_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
):
    """Backward for one block of BLOCK_N keys, looping over all query blocks:
    ``dV = Pd^T dO`` and ``dK = scale * (P o (f * Z o (dO V^T) - delta))^T Q``, computed transposed
    (keys on rows). Padded keys (``j >= L_b``) get zero gradients. Grid ``(cdiv(N, BLOCK_N), batch * heads)``.
    """
    pid_n = tl.program_id(0)
    pid_bh, b, h, length, sm_scale = _batch_head(Lengths, n_heads, seq_len, sm_scale)
    cols, col_ok, cols64 = _block(pid_n * BLOCK_N, length, BLOCK_N)
    offs_d, d_ok, _ = _block(0, head_dim, BLOCK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if pid_n * BLOCK_N < length:  # otherwise every key of the block is padding: zero gradients
        k = _load_tile(K + b * stride_kb + h * stride_kh, cols64, stride_kt, offs_d, col_ok, d_ok)
        v = _load_tile(V + b * stride_vb + h * stride_vh, cols64, stride_vt, offs_d, col_ok, d_ok)
        Q_base = Q + b * stride_qb + h * stride_qh
        DO_base = DO + b * stride_dob + h * stride_doh
        Lse_base = Lse + pid_bh.to(tl.int64) * seq_len
        Delta_base = Delta + pid_bh.to(tl.int64) * seq_len
        qk_scale = sm_scale * _LOG2E
        f, seed_bh = _prob_factor(HeadMask, Seed, h, pid_bh, dropout_p, HAS_HEAD_MASK, HAS_DROPOUT)
        for start_m in range(0, seq_len, BLOCK_M):
            rows, row_ok, rows64 = _block(start_m, seq_len, BLOCK_M)
            q = _load_tile(Q_base, rows64, stride_qt, offs_d, row_ok, d_ok)
            do = _load_tile(DO_base, rows64, stride_dot, offs_d, row_ok, d_ok)
            lse2 = tl.load(Lse_base + rows64, mask=row_ok, other=0.0) * _LOG2E
            delta = tl.load(Delta_base + rows64, mask=row_ok, other=0.0)
            pt = tl.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M]
            pt = tl.where(col_ok[:, None] & row_ok[None, :], pt, 0.0)
            dpt = _dot(v, tl.trans(do), IEEE) * f  # (f * dO V^T)^T
            if HAS_DROPOUT:
                keep = _keep(seed_bh, rows[None, :] * seq_len + cols[:, None], dropout_p)
                pdt = tl.where(keep, pt * f, 0.0)
                dpt = tl.where(keep, dpt, 0.0)
            else:
                pdt = pt * f
            dv += _dot(pdt.to(do.dtype), do, IEEE)
            dk += _dot((pt * (dpt - delta[None, :])).to(q.dtype), q, IEEE)
        dk = dk * sm_scale
    in_seq = cols < seq_len  # padded keys of the block get their zero gradients
    _store_tile(DK + b * stride_dkb + h * stride_dkh, cols64, stride_dkt, offs_d, in_seq, d_ok, dk)
    _store_tile(DV + b * stride_dvb + h * stride_dvh, cols64, stride_dvt, offs_d, in_seq, d_ok, dv)


# ---------------------------------------------------------------------------------------------- AOT
_TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _signature(fn, pointer_types: dict[str, str]) -> dict[str, str]:
    """Every argument of ``fn``: the given pointer types, ``constexpr`` for UPPER-case constexprs,
    ``fp32`` for the float scalars and ``i32`` for the integer scalars (strides, sizes)."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in ("sm_scale", "dropout_p"):
            sig[name] = "fp32"
        elif name.isupper():
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def aot_variants():
    """Every (kernel, dtype, BLOCK_D, flags) variant the launchers can pick on a GPU, with the launch
    settings of :data:`KERNEL_CONFIGS`."""
    from .aot import AotVariant

    variants = []
    for (dtype, block_d), cfgs in KERNEL_CONFIGS.items():
        t = "*" + _TRITON_DTYPE[dtype]
        ieee = dtype == "float32"
        common = {"Lse": "*fp32", "Delta": "*fp32", "Lengths": "*i32", "HeadMask": "*fp32", "Seed": "*i64"}
        for kernel, fn, extra in (("fwd", _attn_fwd, {}), ("bwd_pre", _attn_bwd_rows, {"COMPUTE_DQ": False}),
                                  ("bwd_kv", _attn_bwd_dkdv, {}), ("bwd_q", _attn_bwd_rows, {"COMPUTE_DQ": True})):
            bm, bn, warps, stages = cfgs[kernel]
            ptrs = dict(common, **{n: t for n in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")})
            sig = _signature(fn, ptrs)
            for has_head_mask in (False, True):
                for has_dropout in (False, True):
                    constexprs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "HAS_HEAD_MASK": has_head_mask,
                                  "HAS_DROPOUT": has_dropout, "IEEE": ieee, **extra}
                    name = f"attention.{kernel}[{dtype},D{block_d},hm={int(has_head_mask)},drop={int(has_dropout)}]"
                    variants.append(AotVariant(name, fn, sig, constexprs, warps, stages))
    return variants
