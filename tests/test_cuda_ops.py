"""The CUDA ops of unispeech_fast._C (csrc/cuda) against the eager references, and the cuda backend.

The ``gpu``-marked tests need a GPU and the extension built with CUDA (they fail, not skip, when the
extension lacks CUDA on a GPU machine). Tolerance policy: the kernel's max error against a float64
reference is at most 2x the error of the eager PyTorch computation in the same dtype, plus a floor of
two units roundoff of the dtype scaled by the reference's magnitude (for outputs and every gradient;
``tests/_tolerance.py``). The CPU tests check that the backend
module imports without the extension and explains why it cannot run.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_within_2x_eager, max_err
from unispeech_fast import _extension, dispatch
from unispeech_fast.ops import attention, attention_ref, feature_extractor, feature_extractor_ref
from unispeech_fast.ops import gumbel_quantizer_ref, pos_conv_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def cuda_backend():
    """The cuda implementations the package registers (restoring the registry after, so that other test
    files see it as the package sets it up)."""
    saved = {op: dict(dispatch._REGISTRY[op]) for op in ("attention", "feature_extractor")}
    from types import SimpleNamespace

    from unispeech_fast.ops.feature_extractor import extension as fe_ext

    # The cuda backends of both ops as registered (their reasons: the base check of the declared
    # capabilities plus the backend's own), under the names these tests use.
    attention_impl, fe_impl = dispatch._REGISTRY["attention"]["cuda"], dispatch._REGISTRY["feature_extractor"]["cuda"]
    _cuda = SimpleNamespace(
        _attention_reasons=attention_impl.not_supported_reasons, attention_cuda=attention_impl.fn,
        _feature_extractor_reasons=fe_impl.not_supported_reasons, feature_extractor_cuda=fe_impl.fn,
        layer0_smem_bytes=fe_ext.layer0_smem_bytes, layer0_smem_reasons=fe_ext.layer0_smem_reasons,
    )
    yield _cuda
    for op, impls in saved.items():
        dispatch._REGISTRY[op].clear()
        dispatch._REGISTRY[op].update(impls)


@pytest.fixture
def ops():
    status = _extension.status()
    assert status.has_cuda, f"the gpu tests need unispeech_fast._C built with CUDA: {status.cuda_reason}"
    return torch.ops.unispeech_fast


_err = max_err
# The shared rule (tests/_tolerance.py), with the floor these GPU tests have always used: 2 units roundoff of
# the dtype times (max |ref| + 1).
_assert_close = functools.partial(assert_within_2x_eager, floor_eps=2.0, scale="ref+1")


# ================================================================================================ CPU tests
def test_module_registers_cuda_backends(cuda_backend):
    implemented = dispatch.implemented_backends()
    assert "cuda" in implemented["attention"]
    assert "cuda" in implemented["feature_extractor"]


def test_attention_reasons_on_cpu(cuda_backend):
    q, k, v = (torch.randn(2, 5, 2, 16, requires_grad=True) for _ in range(3))
    reasons = cuda_backend._attention_reasons(q, k, v, dropout_p=0.1, need_weights=True)
    text = "\n".join(reasons)
    assert "CUDA tensors" in text and "cpu" in text
    assert "float16/bfloat16" in text and "torch.float32" in text
    assert "head_dim" in text and "16" in text
    assert "need_weights" in text and "dropout_p=0.1" in text
    assert "the CUDA attention has no backward; the triton backend serves training" in reasons
    if not _extension.status().has_cuda:
        assert any(r.startswith("CUDA extension not available") for r in reasons)
    with torch.no_grad():
        assert not any("no backward" in r for r in cuda_backend._attention_reasons(q, k, v))


def test_attention_reasons_check_masks(cuda_backend):
    q, k, v = (torch.randn(2, 5, 3, 64, dtype=torch.float16) for _ in range(3))
    reasons = cuda_backend._attention_reasons(q, k, v, torch.ones(2, 5), torch.ones(4))
    assert any("key_padding_mask must be bool [batch, frames]" in r for r in reasons)
    assert any("head_mask must be [heads]" in r for r in reasons)


def test_attention_reasons_refuse_grad_head_mask_and_empty_rows(cuda_backend):
    """Issue 16 items 1 and 10: a head_mask that requires grad is refused (the op has no backward), and the
    kernel backends share one mask check that refuses left padding and rows without a valid key."""
    from unispeech_fast.ops.attention import padding_mask_reasons

    q, k, v = (torch.randn(2, 5, 2, 64, dtype=torch.float16) for _ in range(3))
    head_mask = torch.ones(2, requires_grad=True)
    assert any("head_mask requires grad" in r for r in cuda_backend._attention_reasons(q, k, v, None, head_mask))
    with torch.no_grad():
        assert not any("head_mask" in r for r in cuda_backend._attention_reasons(q, k, v, None, head_mask))
    lengths = torch.tensor([5, 0])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    assert padding_mask_reasons(mask) == ["key_padding_mask has a batch row with no valid frame"]
    assert "right-padded" in padding_mask_reasons(torch.tensor([[False, True, True, True, True], [True] * 5]))[0]
    assert padding_mask_reasons(torch.arange(5)[None, :] < torch.tensor([[5], [2]])) == []


def _emulate_cuda_attention(q, k, v, seqlens, scale, block_n=64):
    """fp64 re-statement of ``attention_fwd_kernel``'s per-row rules: ``kv_len`` and ``scale_log2`` from the
    length (L <= 0: all T keys, scale 0), key blocks of 64 with rows at or past ``kv_len`` zero-filled
    (never read), masked scores -inf, online softmax in base 2, ``out = acc / l``."""
    batch, seq, heads, _ = q.shape
    out = torch.empty_like(q)
    for b in range(batch):
        length = int(seqlens[b])
        kv_len = seq if length <= 0 else min(length, seq)
        scale_log2 = 0.0 if length <= 0 else scale * 1.4426950408889634
        for h in range(heads):
            m = torch.full((seq,), -float("inf"), dtype=q.dtype)
            l = torch.zeros(seq, dtype=q.dtype)
            acc = torch.zeros(seq, q.shape[-1], dtype=q.dtype)
            for n0 in range(0, kv_len, block_n):
                rows = torch.arange(n0, n0 + block_n)
                valid = rows < kv_len
                kt = torch.zeros(block_n, q.shape[-1], dtype=q.dtype)
                vt = torch.zeros_like(kt)
                kt[valid], vt[valid] = k[b, rows[valid], h], v[b, rows[valid], h]
                s = torch.where(valid[None, :], (q[b, :, h] @ kt.T) * scale_log2, -float("inf"))
                m_new = torch.maximum(m, s.max(1).values)
                p = torch.exp2(s - m_new[:, None])
                alpha = torch.exp2(m - m_new)
                l = l * alpha + p.sum(1)
                acc = acc * alpha[:, None] + p @ vt
                m = m_new
            out[b, :, h] = acc / l[:, None]
    return out


def test_cuda_attention_row_rules_match_the_reference_in_fp64():
    """Issue 16 items 1 and 4 on CPU: the kernel's rules give the reference's uniform attention for a row
    with no valid key, and a NaN in padded K/V rows does not reach the valid rows' outputs."""
    batch, seq, heads, head_dim = 3, 150, 2, 8
    q, k, v = (torch.randn(batch, seq, heads, head_dim, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([0, 70, seq], dtype=torch.int32)
    k[1, 70:], v[1, 70:] = float("nan"), float("nan")
    mask = torch.arange(seq)[None, :] < lengths[:, None].long()
    got = _emulate_cuda_attention(q, k, v, lengths, head_dim ** -0.5)
    ref = attention_ref(q, k, v, mask)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[[0, 2]], ref[[0, 2]], atol=1e-12, rtol=1e-12)
    k[1, 70:], v[1, 70:] = 0.0, 0.0  # the reference itself multiplies the padded values by zero weights
    torch.testing.assert_close(got[1], attention_ref(q, k, v, mask)[0][1], atol=1e-12, rtol=1e-12)


_UNIFORM_CHECK = r"""
#include <cmath>
#include <cstdio>
#include "cuda/uniform.h"
int main() {
  float lo = 2.f, hi = -1.f; long bad = 0;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const float u = unispeech_fast::uniform_open01((k << 9) | (k & 511u));  // the low 9 bits are ignored
    const float g = -std::log(-std::log(u));
    lo = u < lo ? u : lo; hi = u > hi ? u : hi;
    bad += !(u > 0.f && u < 1.f && std::isfinite(g));
  }
  std::printf("%a %a %ld\n", (double)lo, (double)hi, bad);
  return 0;
}
"""


def test_philox_uniform_never_reaches_0_or_1(tmp_path):
    """Issue 16 item 3: the CUDA Gumbel kernel's bits-to-uniform map (csrc/cuda/uniform.h, compiled here by the
    host compiler, unchanged) gives u in [2^-24, 1 - 2^-24] for every one of the 2^23 codes it reads, so the
    Philox noise -log(-log(u)) is finite; the old (bits >> 8) + 0.5f rounded the top code to u = 1 (+inf)."""
    import pathlib
    import shutil
    import subprocess

    import numpy as np

    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "a host C++ compiler is needed (the extension build needs one too)"
    src = tmp_path / "uniform_check.cpp"
    src.write_text(_UNIFORM_CHECK)
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{csrc}", str(src), "-o", str(tmp_path / "check")], check=True)
    lo, hi, bad = subprocess.run([str(tmp_path / "check")], check=True, capture_output=True, text=True).stdout.split()
    assert (float.fromhex(lo), float.fromhex(hi), int(bad)) == (2.0 ** -24, 1 - 2.0 ** -24, 0)
    top = np.float32(np.uint32(0xFFFFFFFF) >> np.uint32(8)) + np.float32(0.5)  # the old map, in fp32
    assert top * np.float32(2.0 ** -24) == np.float32(1.0)


def test_feature_extractor_shared_memory_limit_follows_the_kernel_formula(cuda_backend):
    """Issue 16 item 9: the reasons refuse layer-0 shapes whose shared memory exceeds the device's opt-in
    limit (A100 163 KiB, H100 227 KiB) instead of letting the launch crash; the real sizes fit."""
    a100, h100 = 163 * 1024, 227 * 1024
    # UniSpeech layer 0: 512 channels, K = 10, stride 5, group norm (base) or layer norm (large).
    assert cuda_backend.layer0_smem_bytes(512, 10, 5, "group") == 4 * (1023 * 5 + 10 + 16 * 10 + 48)
    assert cuda_backend.layer0_smem_bytes(512, 10, 5, "layer") == 4 * (31 * 5 + 10 + 512 * 13 + 768 + 64)
    for norm in ("group", "layer", None):
        assert cuda_backend.layer0_smem_reasons((512, 1, 10), 5, norm, a100) == []
    # What the old fixed limits (K <= 64, C_out <= 2048) admitted: about 550 KB in the frames kernel.
    (reason,) = cuda_backend.layer0_smem_reasons((2048, 1, 64), 5, "layer", h100)
    assert "needs 553068 bytes of shared memory" in reason and f"allows {h100}" in reason
    assert cuda_backend.layer0_smem_reasons((2048, 1, 64), 5, "group", a100) == []  # group kernels: 16 channels a block
    assert cuda_backend.layer0_smem_reasons((512, 1, 10), 64, "group", a100)  # 1023 * 64 samples per chunk


def _fmaf(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fused multiply-add: the fp64 product of two fp32 values is exact, one rounding to fp32 after the add
    (double rounding differs from a true fmaf in rare ties only)."""
    return (a.double() * b.double() + c.double()).float()


def test_group_norm_apply_recomputes_the_statistics_value_in_fp32():
    """Issue 16 item 2 on CPU: an fp32 emulation of ``gn_stats``/``gn_apply`` at one output frame (variance 0,
    so rstd = 1/sqrt(eps) amplifies any rounding difference). Recomputing the conv from the bias, as the
    statistics pass does, gives exactly the fp64 reference's normalised value 0; the old apply (conv from 0,
    ``(bias - mean) * s`` folded into the shift) is off by about 1e-4 against a bound near 1e-7."""
    g = torch.Generator().manual_seed(0)
    channels, kernel, eps = 512, 10, 1e-5
    x = torch.randn(kernel, generator=g)  # 10 samples, K = 10, stride 5: one output frame
    w = torch.randn(channels, kernel, generator=g) * 0.4
    bias = torch.randn(channels, generator=g) * 0.1
    gamma, beta = 1 + 0.2 * torch.randn(channels, generator=g), 0.1 * torch.randn(channels, generator=g)

    def conv_at(start):  # the kernel's conv_at: acc = start, then fmaf(w[k], x[k], acc) for k in order
        acc = start.clone()
        for k in range(kernel):
            acc = _fmaf(w[:, k], x[k].expand(channels), acc)
        return acc

    mean = conv_at(bias)  # Welford over one frame: mean = the value, M2 = 0
    s = torch.rsqrt(torch.tensor(eps, dtype=torch.float32)) * gamma
    new = (conv_at(bias) - mean) * s + beta
    old = _fmaf(conv_at(torch.zeros(channels)), s, (bias - mean) * s + beta)
    h = (w.double() @ x.double()) + bias.double()  # the fp64 reference: GroupNorm of one frame is 0 * rstd
    ref = (h - h) * torch.rsqrt(torch.tensor(eps, dtype=torch.float64)) * gamma.double() + beta.double()
    assert (new.double() - ref).abs().max().item() == 0.0
    assert (old.double() - ref).abs().max().item() > 1e-6  # what the GPU test saw (about 1e-4)


def test_feature_extractor_reasons_on_cpu(cuda_backend):
    x = torch.randn(2, 400, requires_grad=True)
    weights = [torch.randn(8, 1, 10), torch.randn(8, 8, 3)]
    reasons = cuda_backend._feature_extractor_reasons(
        x, weights, [None, None], [torch.ones(8), None], [torch.zeros(8), None], [5, 2], "group", activation="relu"
    )
    text = "\n".join(reasons)
    assert "x must be a CUDA tensor, got cpu" in text
    assert "exact GELU only" in text and "relu" in text
    assert "no backward" in text
    with torch.no_grad():
        quiet = cuda_backend._feature_extractor_reasons(
            x, weights, [None, None], [torch.ones(8), None], [torch.zeros(8), None], [5, 2], "group"
        )
    assert not any("no backward" in r or "GELU" in r for r in quiet)


def test_feature_extractor_reasons_layer0_shape_and_norm(cuda_backend):
    x = torch.randn(2, 400)
    reasons = cuda_backend._feature_extractor_reasons(
        x, [torch.randn(8, 2, 10)], [None], [torch.ones(8)], [None], [5], "layer"
    )
    assert any("layer 0 weight must be [C_out, 1, K]" in r for r in reasons)
    assert any("both be given or both be None" in r for r in reasons)


def test_forced_cuda_backend_on_cpu_raises_with_reasons():
    q, k, v = (torch.randn(1, 3, 2, 64) for _ in range(3))
    with dispatch.backend("cuda"), pytest.raises(dispatch.BackendNotSupportedError, match="backend 'cuda' cannot run"):
        attention(q, k, v)


def test_auto_never_picks_cuda_on_cpu():
    x = torch.randn(1, 50)
    ws, bs, gs, betas = [torch.randn(4, 1, 10)], [None], [None], [None]
    inputs = dict(x=x, conv_weights=ws, conv_biases=bs, norm_weights=gs, norm_biases=betas, conv_strides=[5],
                  norm_type="group", activation="gelu", eps=1e-5)
    assert dispatch.select("feature_extractor", inputs).backend != "cuda"
    out = feature_extractor(x, ws, bs, gs, betas, [5], "group")
    torch.testing.assert_close(out, feature_extractor_ref(x, ws, bs, gs, betas, [5], "group"))


def test_right_padded_lengths_give_the_cuda_seqlens():
    from unispeech_fast.ops.attention import right_padded_lengths

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert right_padded_lengths(mask).tolist() == [3, 4, 0]
    assert right_padded_lengths(mask).dtype == torch.int32
    assert right_padded_lengths(torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)) is None
    assert right_padded_lengths(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)) is None


# ================================================================================================ GPU: attention
def _lengths(batch: int, seq: int) -> list[int]:
    return [seq, max(1, seq // 2), max(1, seq - 5)][:batch]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq", [1, 17, 64, 127, 273])
def test_attention_matches_reference(ops, dtype, head_dim, seq):
    batch, heads = 3, 4
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    mask = torch.arange(seq, device="cuda")[None, :] < torch.tensor(_lengths(batch, seq), device="cuda")[:, None]
    head_mask = torch.tensor([1.0, 0.0, 0.5, 2.0], device="cuda")
    ref = attention_ref(q.double(), k.double(), v.double(), mask, head_mask.double())[0]
    eager = attention_ref(q, k, v, mask, head_mask)[0]
    with torch.no_grad(), dispatch.backend("cuda"):
        out, weights = attention(q, k, v, mask, head_mask)
    assert weights is None and out.dtype == dtype
    _assert_close("attention", out, eager, ref)
    # Without mask and head mask; and the raw op with an explicit scale.
    _assert_close("attention (no masks)", ops.attention_fwd(q, k, v, None, None, head_dim ** -0.5),
                  attention_ref(q, k, v)[0], attention_ref(q.double(), k.double(), v.double())[0])
    _assert_close("attention (scale 0.3)", ops.attention_fwd(q, k, v, None, None, 0.3),
                  attention_ref(q, k, v, scale=0.3)[0], attention_ref(q.double(), k.double(), v.double(), scale=0.3)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_attention_strided_views_and_unaligned(ops, dtype):
    batch, seq, heads, head_dim = 2, 77, 3, 64
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=dtype)  # fused projection layout
    q, k, v = qkv.unbind(2)
    eager = attention_ref(q, k, v)[0]
    ref = attention_ref(q.double(), k.double(), v.double())[0]
    _assert_close("attention (fused qkv views)", ops.attention_fwd(q, k, v, None, None, head_dim ** -0.5), eager, ref)
    buf = torch.randn(3, batch, seq, heads, head_dim + 1, device="cuda", dtype=dtype)
    q, k, v = buf[..., 1:].unbind(0)  # not 16-byte aligned: the scalar load path
    eager = attention_ref(q, k, v)[0]
    ref = attention_ref(q.double(), k.double(), v.double())[0]
    _assert_close("attention (unaligned)", ops.attention_fwd(q, k, v, None, None, head_dim ** -0.5), eager, ref)


@pytest.mark.gpu
def test_attention_zero_length_row_attends_uniformly(ops):
    batch, seq, heads, head_dim = 2, 40, 2, 64
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = torch.zeros(batch, seq, dtype=torch.bool, device="cuda")
    mask[1, :7] = True
    ref = attention_ref(q.double(), k.double(), v.double(), mask)[0]
    eager = attention_ref(q, k, v, mask)[0]
    seqlens = torch.tensor([0, 7], dtype=torch.int32, device="cuda")
    _assert_close("attention (length 0)", ops.attention_fwd(q, k, v, seqlens, None, head_dim ** -0.5), eager, ref)
    # Issue 16 item 4: NaN in the padded keys/values of row 1 (inside its only key block) stays out.
    k[1, 7:], v[1, 7:] = float("nan"), float("nan")
    out = ops.attention_fwd(q, k, v, seqlens, None, head_dim ** -0.5)
    _assert_close("attention (NaN padding)", out[1], eager[1], ref[1])


@pytest.mark.gpu
def test_attention_cuda_refuses_training_and_bad_inputs(ops, cuda_backend):
    q, k, v = (torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    no_backward = "the CUDA attention has no backward; the triton backend serves training"
    assert no_backward in cuda_backend._attention_reasons(q, k, v)
    left_padded = torch.tensor([[False] * 3 + [True] * 5], device="cuda")
    with torch.no_grad():
        assert cuda_backend._attention_reasons(q, k, v) == []
        assert any("right-padded" in r for r in cuda_backend._attention_reasons(q, k, v, left_padded))
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        ops.attention_fwd(q[..., :32], k[..., :32], v[..., :32], None, None, 1.0)
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16"):
        ops.attention_fwd(q.float(), k.float(), v.float(), None, None, 1.0)


# ============================================================================================ GPU: feature extractor
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_kind", [0, 1, 2])
@pytest.mark.parametrize("samples,channels", [(10, 37), (11, 512), (403, 37), (5 * 2100 + 13, 512)])
def test_conv_norm_gelu_layer0(ops, dtype, norm_kind, samples, channels):
    batch = 2
    x = torch.randn(batch, samples, device="cuda", dtype=dtype)
    w = (torch.randn(channels, 1, 10, device="cuda") * 0.4).to(dtype)
    b = (torch.randn(channels, device="cuda") * 0.1).to(dtype)
    gamma = (1 + 0.2 * torch.randn(channels, device="cuda")).to(dtype) if norm_kind else None
    beta = (0.1 * torch.randn(channels, device="cuda")).to(dtype) if norm_kind else None
    norm_type = "layer" if norm_kind == 2 else "group"

    def run_ref(t):
        cast = (lambda a: None if a is None else a.to(t))
        return feature_extractor_ref(x.to(t), [w.to(t)], [b.to(t)], [cast(gamma)], [cast(beta)], [5], norm_type)

    out = ops.conv_norm_gelu_fwd(x[:, None], w, b, gamma, beta, 5, norm_kind, 1e-5)
    assert out.dtype == dtype
    _assert_close(f"conv_norm_gelu kind {norm_kind}", out, run_ref(dtype), run_ref(torch.float64))


@pytest.mark.gpu
def test_conv_norm_gelu_large_offset_statistics(ops):
    """GroupNorm statistics over a long axis with a large mean (catastrophic cancellation check)."""
    x = torch.randn(1, 5 * 6000 + 5, device="cuda") + 50.0
    w = torch.full((4, 1, 10), 0.1, device="cuda") + 0.01 * torch.randn(4, 1, 10, device="cuda")
    gamma, beta = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda")
    out = ops.conv_norm_gelu_fwd(x[:, None], w, None, gamma, beta, 5, 1, 1e-5)
    ref = feature_extractor_ref(x.double(), [w.double()], [None], [gamma.double()], [beta.double()], [5], "group")
    eager = feature_extractor_ref(x, [w], [None], [gamma], [beta], [5], "group")
    _assert_close("conv_norm_gelu (offset)", out, eager, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_type", ["group", "layer"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_feature_extractor_cuda_backend(norm_type, dtype):
    torch.manual_seed(1)
    dims, kernels, strides = [32, 32, 32], [10, 3, 2], [5, 2, 2]
    ws, bs, gs, betas, c_in = [], [], [], [], 1
    for i, (c, k) in enumerate(zip(dims, kernels)):
        ws.append((torch.randn(c, c_in, k, device="cuda") / (c_in * k) ** 0.5).to(dtype))
        bs.append(None)
        with_norm = norm_type == "layer" or i == 0
        gs.append((1 + 0.1 * torch.randn(c, device="cuda")).to(dtype) if with_norm else None)
        betas.append((0.1 * torch.randn(c, device="cuda")).to(dtype) if with_norm else None)
        c_in = c
    x = torch.randn(3, 1601, device="cuda", dtype=dtype)
    with torch.no_grad(), dispatch.backend("cuda"):
        out = feature_extractor(x, ws, bs, gs, betas, strides, norm_type)
    to64 = (lambda ts: [None if t is None else t.double() for t in ts])
    ref = feature_extractor_ref(x.double(), to64(ws), bs, to64(gs), to64(betas), strides, norm_type)
    eager = feature_extractor_ref(x, ws, bs, gs, betas, strides, norm_type)
    _assert_close(f"feature_extractor ({norm_type})", out, eager, ref)


@pytest.mark.gpu
def test_conv_norm_gelu_refuses_multichannel_input(ops):
    x = torch.randn(1, 2, 100, device="cuda")
    with pytest.raises(RuntimeError, match="one input channel"):
        ops.conv_norm_gelu_fwd(x, torch.randn(4, 2, 10, device="cuda"), None, None, None, 5, 0, 1e-5)


# ================================================================================================ GPU: pos_conv
def _pos_conv_folded(x, weight, bias, groups):
    """Test oracle of the raw op (weight norm already folded): x + gelu(conv1d(x^T)[..., :T])^T."""
    k = weight.shape[-1]
    h = F.conv1d(x.transpose(1, 2), weight, bias, padding=k // 2, groups=groups)[:, :, : x.shape[1]]
    return x + F.gelu(h).transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hidden,groups,kernel,seq",
    [(96, 2, 16, 1), (96, 2, 16, 37), (128, 2, 128, 130), (128, 2, 128, 37), (20, 4, 7, 37), (20, 4, 7, 1),
     (768, 16, 128, 130)],
)
def test_pos_conv_fwd_bwd(ops, dtype, hidden, groups, kernel, seq):
    cg = hidden // groups
    x = torch.randn(2, seq, hidden, device="cuda").to(dtype)
    w = (torch.randn(hidden, cg, kernel, device="cuda") / (cg * kernel) ** 0.5).to(dtype)
    b = (0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    grad_out = torch.randn(2, seq, hidden, device="cuda").to(dtype)

    out, pre = ops.pos_conv_fwd(x, w, b, groups, True)
    grad_x, grad_w, grad_b = ops.pos_conv_bwd(grad_out, x, w, pre, groups, True)

    def autograd(t):
        xs, ws, bs = (a.detach().to(t).requires_grad_() for a in (x, w, b))
        y = _pos_conv_folded(xs, ws, bs, groups)
        y.backward(grad_out.to(t))
        return y.detach(), xs.grad, ws.grad, bs.grad

    ref, eager = autograd(torch.float64), autograd(dtype)
    for name, o, e, r in zip(("out", "grad_x", "grad_weight", "grad_bias"), (out, grad_x, grad_w, grad_b), eager, ref):
        _assert_close(f"pos_conv {name}", o, e, r)
    # The folded-weight op agrees with the package reference (weight norm with g = ||w|| per tap).
    g = w.double().norm(dim=(0, 1), keepdim=True)
    ref_pkg = pos_conv_ref(x.double(), g, w.double(), b.double(), groups)
    _assert_close("pos_conv vs pos_conv_ref", out, eager[0], ref_pkg)
    _, no_pre = ops.pos_conv_fwd(x, w, None, groups, False)
    assert no_pre.numel() == 0
    _, _, no_gb = ops.pos_conv_bwd(grad_out, x, w, pre, groups, False)
    assert no_gb.numel() == 0


# ================================================================================================ GPU: gumbel quantizer
def _gumbel_oracle(logits, codevectors, groups, tau, gumbels, mask=None):
    """Test oracle of the raw sampling op with given noise (straight-through, perplexity of softmax(l)).

    With ``mask`` (bool ``[N]``) the marginal is the sum of softmax(l) over the rows in the mask divided by
    their count: the formula of csrc/cpu/gumbel_quantizer.cpp, which the CPU test below checks the C++
    kernel against in float64 and the gpu tests check the CUDA kernel against."""
    n, gv = logits.shape
    v = gv // groups
    z = (logits + gumbels).view(n, groups, v)
    soft = torch.softmax(z / tau, dim=-1)
    hard = F.one_hot(z.argmax(-1), v).to(soft.dtype)
    y = hard - soft.detach() + soft
    quantized = torch.einsum("ngv,gvd->ngd", y, codevectors.view(groups, v, -1)).reshape(n, -1)
    probs = torch.softmax(logits.view(n, groups, v), dim=-1)
    if mask is None:
        marginal = probs.mean(0)
    else:
        marginal = (probs * mask.to(probs.dtype)[:, None, None]).sum(0) / mask.sum()
    perplexity = torch.exp(-torch.xlogy(marginal, marginal).sum(-1)).sum()
    return quantized, z.argmax(-1), soft, perplexity


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,groups,codes,dg", [(1, 1, 5, 3), (37, 2, 320, 128), (300, 2, 33, 17)])
def test_gumbel_quantizer_eval_matches_reference(ops, dtype, rows, groups, codes, dg):
    logits = torch.randn(rows, groups * codes, device="cuda").to(dtype)
    code = torch.randn(groups * codes, dg, device="cuda").to(dtype)
    q, idx, soft, perp = ops.gumbel_quantizer_fwd(logits, code, groups, 2.0, False, None, 0, 0)
    ref_q, _ = gumbel_quantizer_ref(logits[None], code[None], groups, 2.0, False)
    torch.testing.assert_close(q, ref_q[0], rtol=0, atol=0)  # a gather: exact
    torch.testing.assert_close(idx, logits.view(rows, groups, codes).argmax(-1))  # first index on ties
    assert soft.numel() == 0 and perp.dtype == torch.float32
    # The perplexity is fp32 whatever the input dtype: compare with the float64 reference.
    _, ref_perp = gumbel_quantizer_ref(logits.double()[None], code.double()[None], groups, 2.0, False)
    torch.testing.assert_close(perp.double(), ref_perp, rtol=1e-5, atol=1e-5)
    gq = torch.randn_like(q)
    one = torch.ones((), device="cuda")
    grad_l, grad_c = ops.gumbel_quantizer_bwd(gq, one, logits, code, idx, soft, groups, 2.0, False)
    assert (grad_l == 0).all()
    expected = torch.zeros(groups * codes, dg, device="cuda", dtype=torch.float64)
    flat_idx = (idx + torch.arange(groups, device="cuda") * codes).reshape(-1)
    expected.index_add_(0, flat_idx, gq.double().view(rows * groups, dg))
    _assert_close("gumbel grad_codevectors (eval)", grad_c, expected.to(dtype), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,groups,codes,dg", [(3, 1, 7, 5), (129, 2, 320, 128)])
def test_gumbel_quantizer_sample_with_given_noise(ops, dtype, rows, groups, codes, dg):
    tau = 0.7
    logits = torch.randn(rows, groups * codes, device="cuda").to(dtype)
    code = torch.randn(groups * codes, dg, device="cuda").to(dtype)
    gumbels = -torch.empty(rows, groups * codes, device="cuda").exponential_().log()
    q, idx, soft, perp = ops.gumbel_quantizer_fwd(logits, code, groups, tau, True, gumbels, 0, 0)
    gq = torch.randn_like(q)
    g_perp = torch.tensor(0.37, device="cuda")
    grad_l, grad_c = ops.gumbel_quantizer_bwd(gq, g_perp, logits, code, idx, soft, groups, tau, True)

    def run(t):
        ls, cs = logits.detach().to(t).requires_grad_(), code.detach().to(t).requires_grad_()
        oq, oidx, osoft, operp = _gumbel_oracle(ls, cs, groups, tau, gumbels.to(t))
        ((oq * gq.to(t)).sum() + operp * g_perp.to(t)).backward()
        return oq.detach(), oidx, osoft.detach(), operp.detach(), ls.grad, cs.grad

    ref, eager = run(torch.float64), run(dtype)
    fp32 = run(torch.float32)  # soft and perplexity are fp32 outputs: their eager peer is the fp32 computation
    torch.testing.assert_close(idx, ref[1])
    _assert_close("gumbel quantized", q, eager[0], ref[0])
    _assert_close("gumbel soft", soft, fp32[2], ref[2])
    _assert_close("gumbel perplexity", perp, fp32[3], ref[3])
    _assert_close("gumbel grad_logits", grad_l, eager[4], ref[4])
    _assert_close("gumbel grad_codevectors", grad_c, eager[5], ref[5])


@pytest.mark.gpu
def test_gumbel_quantizer_philox_noise(ops):
    rows, groups, codes = 4096, 2, 8
    logits = torch.zeros(rows, groups * codes, device="cuda")
    code = torch.randn(groups * codes, 4, device="cuda")
    a = ops.gumbel_quantizer_fwd(logits, code, groups, 1.0, True, None, 1234, 0)
    b = ops.gumbel_quantizer_fwd(logits, code, groups, 1.0, True, None, 1234, 0)
    c = ops.gumbel_quantizer_fwd(logits, code, groups, 1.0, True, None, 1234, 1)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])  # deterministic in (seed, offset)
    assert not torch.equal(a[1], c[1])
    counts = torch.bincount(a[1].reshape(-1), minlength=codes).float()
    expected = rows * groups / codes
    assert ((counts - expected).abs() < 0.15 * expected).all(), counts  # argmax of Gumbel noise is uniform
    torch.testing.assert_close(a[2].sum(-1), torch.ones(rows, groups, device="cuda"))


@pytest.mark.gpu
@pytest.mark.slow
def test_gumbel_quantizer_philox_noise_finite_at_real_size(ops):
    """Issue 16 item 3: 65536 x 2 x 320 = 4.2e7 Philox draws (the old map hit u = 1, i.e. +inf noise, with
    probability 2^-24 each: about 2.5 times here). Outputs and gradients must all be finite."""
    rows, groups, codes, dg = 65536, 2, 320, 128
    logits = torch.randn(rows, groups * codes, device="cuda")
    code = torch.randn(groups * codes, dg, device="cuda")
    q, idx, soft, perp = ops.gumbel_quantizer_fwd(logits, code, groups, 2.0, True, None, 7, 0)
    for name, t in (("quantized", q), ("soft", soft), ("perplexity", perp)):
        assert torch.isfinite(t).all(), name
    grad_l, grad_c = ops.gumbel_quantizer_bwd(torch.randn_like(q), torch.ones((), device="cuda"), logits, code, idx,
                                              soft, groups, 2.0, True)
    assert torch.isfinite(grad_l).all() and torch.isfinite(grad_c).all()


@pytest.mark.gpu
@pytest.mark.parametrize("sample", [False, True])
def test_gumbel_quantizer_no_row_gives_nan_perplexity(ops, sample):
    """N = 0 without a mask: the mean over no row is NaN, as eager, the C++ and the Triton backends give
    (tests/ops/test_gumbel_quantizer.py); the kernel returned 0."""
    logits = torch.randn(0, 2 * 5, device="cuda")
    code = torch.randn(2 * 5, 3, device="cuda")
    gumbels = torch.zeros_like(logits) if sample else None
    q, idx, soft, perp = ops.gumbel_quantizer_fwd(logits, code, 2, 1.5, sample, gumbels, 0, 0)
    assert q.shape == (0, 6) and idx.shape == (0, 2) and torch.isnan(perp).item()


# ------------------------------------------------------------------------------------ gumbel quantizer: perplexity mask
def _row_mask(rows, device, seed=3):
    """A bool ``[rows]`` mask with about half the rows, at least the first one."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, generator=g) < 0.5
    mask[0] = True
    return mask.to(device)


def test_gumbel_cuda_reasons_let_a_masked_call_through():
    """The cuda backend's reasons give a masked call exactly the answer they give an unmasked one (on fake
    CUDA tensors: here that the extension was built without CUDA; with a CUDA build, no reason at all)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from unispeech_fast.ops import _extension_ops
    from unispeech_fast.ops.gumbel_quantizer import extension as ext

    _extension_ops.ensure_registered()  # load the extension outside the fake mode
    with FakeTensorMode():
        logits = torch.empty(2, 5, 2 * 320, device="cuda")
        codevectors = torch.empty(1, 2 * 320, 128, device="cuda")
        mask = torch.empty(2, 5, dtype=torch.bool, device="cuda")
    for sample in (False, True):
        plain = ext._gumbel_cuda_reasons(logits, codevectors, 2, 2.0, sample)
        masked = ext._gumbel_cuda_reasons(logits, codevectors, 2, 2.0, sample, mask=mask, return_indices=True)
        assert masked == plain, (masked, plain)
        assert not any("mask" in r for r in masked), masked
        assert masked == [], masked  # device and kernel presence are the capability check's (dispatch.registry)
    # Every other check stays: a masked call with too many groups is still refused for that reason.
    with FakeTensorMode():
        many = torch.empty(2, 5, 33 * 4, device="cuda")
        many_cv = torch.empty(1, 33 * 4, 8, device="cuda")
    reasons = ext._gumbel_cuda_reasons(many, many_cv, 33, 2.0, True, mask=mask)
    assert any("at most 32 groups" in r for r in reasons), reasons


@pytest.mark.parametrize("sample", [False, True])
def test_gumbel_cpu_kernel_mask_is_the_oracle_formula(sample):
    """The C++ CPU kernel with a mask equals the masked float64 oracle the gpu tests hold the CUDA kernel to
    (one formula for both kernels); rows outside the mask get no perplexity gradient."""
    from unispeech_fast.ops import _extension_ops as ext

    assert ext.ensure_registered(), "the C++ extension is not built"
    ops = torch.ops.unispeech_fast
    rows, groups, codes, dg, tau = 23, 2, 7, 5, 0.7
    logits = 2 * torch.randn(rows, groups * codes, dtype=torch.float64)
    code = torch.randn(groups * codes, dg, dtype=torch.float64)
    gumbels = -torch.empty(rows, groups * codes, dtype=torch.float64).exponential_().log()
    mask = _row_mask(rows, "cpu")
    gq, g_perp = torch.randn(rows, groups * dg, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    q, idx, soft, perp = ops.gumbel_quantizer_fwd(logits, code, groups, tau, sample, gumbels if sample else None,
                                                  0, 0, mask)
    grad_l, grad_c = ops.gumbel_quantizer_bwd(gq, g_perp, logits, code, idx, soft, groups, tau, sample, mask)
    if sample:
        ls, cs = logits.clone().requires_grad_(), code.clone().requires_grad_()
        oq, oidx, osoft, operp = _gumbel_oracle(ls, cs, groups, tau, gumbels, mask)
        ((oq * gq).sum() + operp * g_perp).backward()
        torch.testing.assert_close(idx, oidx)
        torch.testing.assert_close(soft, osoft.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad_l, ls.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_c, cs.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(q, oq.detach(), rtol=0, atol=0)
        _, _, _, unmasked_perp = _gumbel_oracle(logits, code, groups, tau, gumbels)
        assert not torch.isclose(perp, unmasked_perp)  # the mask does change the number
        # Rows outside the mask: exactly the gradient without the perplexity term.
        no_perp, _ = ops.gumbel_quantizer_bwd(gq, torch.zeros_like(g_perp), logits, code, idx, soft, groups, tau,
                                              sample, mask)
        assert torch.equal(grad_l[~mask], no_perp[~mask]) and not torch.equal(grad_l[mask], no_perp[mask])
    else:
        _, operp = gumbel_quantizer_ref(logits[None], code[None], groups, tau, False, mask=mask[None])
        assert (grad_l == 0).all()
    torch.testing.assert_close(perp, operp.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,groups,codes,dg", [(3, 1, 7, 5), (129, 2, 320, 128), (300, 2, 33, 17)])
def test_gumbel_quantizer_masked_sample_with_given_noise(ops, dtype, rows, groups, codes, dg):
    tau = 0.7
    logits = torch.randn(rows, groups * codes, device="cuda").to(dtype)
    code = torch.randn(groups * codes, dg, device="cuda").to(dtype)
    gumbels = -torch.empty(rows, groups * codes, device="cuda").exponential_().log()
    mask = _row_mask(rows, "cuda")
    q, idx, soft, perp = ops.gumbel_quantizer_fwd(logits, code, groups, tau, True, gumbels, 0, 0, mask)
    gq = torch.randn_like(q)
    g_perp = torch.tensor(0.37, device="cuda")
    grad_l, grad_c = ops.gumbel_quantizer_bwd(gq, g_perp, logits, code, idx, soft, groups, tau, True, mask)

    def run(t):
        ls, cs = logits.detach().to(t).requires_grad_(), code.detach().to(t).requires_grad_()
        oq, oidx, osoft, operp = _gumbel_oracle(ls, cs, groups, tau, gumbels.to(t), mask)
        ((oq * gq.to(t)).sum() + operp * g_perp.to(t)).backward()
        return oq.detach(), oidx, osoft.detach(), operp.detach(), ls.grad, cs.grad

    ref, eager = run(torch.float64), run(dtype)
    fp32 = run(torch.float32)  # soft and perplexity are fp32 outputs: their eager peer is the fp32 computation
    torch.testing.assert_close(idx, ref[1])
    _assert_close("masked gumbel quantized", q, eager[0], ref[0])
    _assert_close("masked gumbel soft", soft, fp32[2], ref[2])
    _assert_close("masked gumbel perplexity", perp, fp32[3], ref[3])
    _assert_close("masked gumbel grad_logits", grad_l, eager[4], ref[4])
    _assert_close("masked gumbel grad_codevectors", grad_c, eager[5], ref[5])
    # Rows outside the mask: exactly the gradient without the perplexity term.
    no_perp, _ = ops.gumbel_quantizer_bwd(gq, torch.zeros_like(g_perp), logits, code, idx, soft, groups, tau, True,
                                          mask)
    assert torch.equal(grad_l[~mask], no_perp[~mask])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gumbel_quantizer_masked_eval_perplexity(ops, dtype):
    rows, groups, codes, dg = 300, 2, 33, 17
    logits = torch.randn(rows, groups * codes, device="cuda").to(dtype)
    code = torch.randn(groups * codes, dg, device="cuda").to(dtype)
    mask = _row_mask(rows, "cuda")
    q, idx, soft, perp = ops.gumbel_quantizer_fwd(logits, code, groups, 2.0, False, None, 0, 0, mask)
    _, ref_perp = gumbel_quantizer_ref(logits.double()[None], code.double()[None], groups, 2.0, False,
                                       mask=mask[None])
    torch.testing.assert_close(perp.double(), ref_perp, rtol=1e-5, atol=1e-5)
    _, unmasked = gumbel_quantizer_ref(logits.double()[None], code.double()[None], groups, 2.0, False)
    assert not torch.isclose(perp.double(), unmasked, rtol=1e-5, atol=1e-5)
    gq = torch.randn_like(q)
    grad_l, grad_c = ops.gumbel_quantizer_bwd(gq, torch.ones((), device="cuda"), logits, code, idx, soft, groups,
                                              2.0, False, mask)
    assert (grad_l == 0).all()
    _, plain_c = ops.gumbel_quantizer_bwd(gq, torch.ones((), device="cuda"), logits, code, idx, soft, groups,
                                          2.0, False)
    torch.testing.assert_close(grad_c, plain_c)  # the mask only concerns the perplexity (fp32 atomics: order)


@pytest.mark.gpu
def test_gumbel_quantizer_mask_of_no_row_and_bad_mask(ops):
    """A mask with no row gives a NaN perplexity and no perplexity gradient (the CPU kernel's rule); a mask of
    the wrong shape, dtype or device is refused by name."""
    rows, groups, codes, dg = 40, 2, 9, 4
    logits = torch.randn(rows, groups * codes, device="cuda")
    code = torch.randn(groups * codes, dg, device="cuda")
    gumbels = -torch.empty(rows, groups * codes, device="cuda").exponential_().log()
    none = torch.zeros(rows, dtype=torch.bool, device="cuda")
    q, idx, soft, perp = ops.gumbel_quantizer_fwd(logits, code, groups, 1.0, True, gumbels, 0, 0, none)
    assert torch.isnan(perp)
    gq = torch.randn_like(q)
    grad_l, _ = ops.gumbel_quantizer_bwd(gq, torch.ones((), device="cuda"), logits, code, idx, soft, groups, 1.0,
                                         True, none)
    no_perp, _ = ops.gumbel_quantizer_bwd(gq, torch.zeros((), device="cuda"), logits, code, idx, soft, groups, 1.0,
                                          True, none)
    assert torch.equal(grad_l, no_perp)
    empty = ops.gumbel_quantizer_fwd(logits[:0], code, groups, 1.0, True, gumbels[:0], 0, 0, none[:0])
    assert torch.isnan(empty[3])
    for bad in (none.long(), none[:-1], none.cpu(), none[None]):
        with pytest.raises(RuntimeError, match="mask must be a bool tensor of shape"):
            ops.gumbel_quantizer_fwd(logits, code, groups, 1.0, True, gumbels, 0, 0, bad)
        with pytest.raises(RuntimeError, match="mask must be a bool tensor of shape"):
            ops.gumbel_quantizer_bwd(gq, torch.ones((), device="cuda"), logits, code, idx, soft, groups, 1.0, True,
                                     bad)


@pytest.mark.gpu
@pytest.mark.parametrize("sample", [False, True])
def test_gumbel_quantizer_cuda_backend_with_mask(sample):
    """Through dispatch (forced cuda backend, autograd included) against the eager reference with the same
    noise: outputs and gradients within 2x eager's float32 error."""
    from unispeech_fast.ops import gumbel_quantizer

    batch, frames, groups, codes, dg, tau = 3, 37, 2, 320, 128, 2.0
    logits = 2 * torch.randn(batch, frames, groups * codes, device="cuda")
    code = torch.randn(1, groups * codes, dg, device="cuda")
    mask = torch.rand(batch, frames, device="cuda") < 0.4
    mask[1] = False  # a fully padded utterance
    mask[0, 0] = True
    weight = torch.randn(batch, frames, groups * dg, device="cuda", dtype=torch.float64)
    torch.manual_seed(11)
    noise = -torch.empty(batch * frames * groups, codes, device="cuda").exponential_().log()
    noise = noise.view(batch, frames, groups * codes)

    def run(fn, t, **kw):
        ls, cs = logits.detach().to(t).requires_grad_(), code.detach().to(t).requires_grad_()
        q, ppl = fn(ls, cs, groups, tau, sample, mask=mask, **kw)
        ((q.double() * weight).sum() + 0.7 * ppl.double()).backward()
        return q.detach(), ppl.detach(), ls.grad, cs.grad

    kw = {"gumbels": noise} if sample else {}
    ref = run(gumbel_quantizer_ref, torch.float64, **kw)
    eager = run(gumbel_quantizer_ref, torch.float32, **kw)
    torch.manual_seed(11)  # the cuda backend draws F.gumbel_softmax's noise from the same generator state
    with dispatch.backend("cuda"):
        assert dispatch.select("gumbel_quantizer", dict(logits=logits, codevectors=code, num_groups=groups,
                                                        temperature=tau, sample=sample, mask=mask)).backend == "cuda"
        ours = run(gumbel_quantizer, torch.float32)
    for name, o, e, r in zip(("quantized", "perplexity", "grad_logits", "grad_codevectors"), ours, eager, ref):
        if r is None:
            assert o is None and not sample, name
            continue
        _assert_close(f"cuda backend masked {name}", o, e, r)
