"""The Triton flash-attention backend against the fp64 reference: forward, gradients, padding, head
mask, dropout (reproducibility and the exact mask, recovered through a one-hot V), custom-op checks,
torch.compile, the need_weights fallback and the AOT variant list.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (set by conftest), at small
shapes; the ``gpu``-marked tests repeat the checks at the model's real sizes.

The C++ CPU flash attention (``cpp`` backend, ``csrc/cpu/attention.cpp``; the section "cpp backend"
below) against the same reference and rule: awkward lengths (1, 7, 129, 1000 frames: one, partial and
several key blocks), key padding (a fully padded row included), head masks, fp32 / bf16 / fp16 / fp64,
gradients (the backward recomputes the reference), custom-op checks, torch.compile, and whole models
under ``backend("cpp")``.

The eager reference against an explicit loop; the CUDA attention (``cuda`` backend, ``csrc/cuda/attention.cu``:
section "cuda backend"): its reasons and row rules on CPU, the kernel on ``gpu``.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import unispeech_fast as uf
from unispeech_fast import _extension, dispatch
from unispeech_fast.ops import _extension_ops as ext
from unispeech_fast.ops.attention import attention, attention_ref
from unispeech_fast.ops.attention import extension as _attention_cpp  # the cpp (and cuda) backends
from unispeech_fast.ops.attention.reference import attention_eager as _attention_eager
from unispeech_fast.ops.attention.triton import _attention_triton
from _backends import DEVICE
from _tolerance import FLOOR, assert_close_cuda as _assert_close, assert_within_2x_eager
from conftest import padded_batch, tiny_config_kwargs

# Relative tolerance of the dropout checks, which have no eager counterpart (different random masks).
_DROPOUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def make_qkv(batch, frames, heads, head_dim, dtype, device=DEVICE, seed=0):
    """q, k, v as the model makes them: strided ``unbind`` views of one ``[B, T, 3, H, D]`` projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, frames, 3, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    return list(qkv.unbind(2))


def right_padded_mask(lengths, frames, device=DEVICE):
    return torch.arange(frames, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def _run(fn, q, k, v, dout, **kw):
    """Output and (dq, dk, dv) of ``fn``, called on strided views of one ``[B, T, 3, H, D]`` leaf."""
    qkv = torch.stack([q.detach(), k.detach(), v.detach()], dim=2).requires_grad_()
    out, _ = fn(*qkv.unbind(2), **kw)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + list(qkv.grad.unbind(2))


def check_against_reference(q, k, v, backend="triton", **kw):
    """``backend``'s output and gradients vs the fp64 reference: error <= 2x eager's error in q's dtype + floor (the
    shared rule, its floor per dtype taken as absolute: stricter than the scaled one, as these tests always were)."""
    dtype = q.dtype
    dout = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    ref = _run(attention_ref, q.double(), k.double(), v.double(), dout, **kw)
    eager = _run(_attention_eager, q, k, v, dout, **kw)
    with dispatch.backend(backend):
        got = _run(attention, q, k, v, dout, **kw)
    for name, g, e, r in zip(("out", "dq", "dk", "dv"), got, eager, ref):
        assert g.dtype == dtype
        assert_within_2x_eager(name, g, e, r, FLOOR[dtype], scale="none")
    return got


# --------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("frames,head_dim", [(1, 16), (17, 64), (67, 80), (40, 32)])
def test_matches_reference(dtype, frames, head_dim):
    q, k, v = make_qkv(2, frames, 1, head_dim, dtype)
    check_against_reference(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padding_and_head_mask(dtype):
    """Different valid lengths per row (one of length 1: every key block but the first is skipped),
    and a head mask with a zero and a non-binary value."""
    frames = 37
    q, k, v = make_qkv(3, frames, 2, 64, dtype)
    mask = right_padded_mask([frames, 1, 20], frames)
    head_mask = torch.tensor([0.0, 0.7], device=DEVICE)
    got = check_against_reference(q, k, v, key_padding_mask=mask, head_mask=head_mask)
    out, dq, dk, dv = got
    assert torch.all(out[:, :, 0] == 0) and torch.all(dq[:, :, 0] == 0) and torch.all(dv[:, :, 0] == 0)
    assert torch.all(dk[~mask] == 0) and torch.all(dv[~mask] == 0)  # padded keys get no gradient


def test_head_dim_80_with_padding_fp32():
    q, k, v = make_qkv(2, 23, 2, 80, torch.float32)
    check_against_reference(q, k, v, key_padding_mask=right_padded_mask([5, 23], 23), scale=0.3,
                            head_mask=torch.tensor([1.5, 1.0], device=DEVICE))


@pytest.mark.parametrize("backend,frames,valid", [("triton", 30, 19), ("cpp", 300, 259)])
def test_padded_batch_equals_per_sample(backend, frames, valid):
    """Padding a sample with extra frames leaves its valid queries' outputs unchanged."""
    q, k, v = make_qkv(1, frames, 2, 32, torch.float32)
    mask = right_padded_mask([valid], frames)
    with dispatch.backend(backend):
        padded, _ = attention(q, k, v, key_padding_mask=mask)
        alone, _ = attention(q[:, :valid], k[:, :valid], v[:, :valid])
    torch.testing.assert_close(padded[:, :valid], alone, atol=1e-6, rtol=1e-5)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_row_gives_the_references_uniform_attention(dtype):
    """Issue 16 item 1: a batch row without valid keys (which dispatch refuses, but torch.compile skips that
    data-dependent check) gives the reference's uniform average over all keys and zero dQ/dK, not NaN.
    The kernels are called directly, as a compiled graph calls them; the eager error is the reference's in
    ``dtype``."""
    frames = 37
    q, k, v = make_qkv(3, frames, 2, 32, dtype)
    mask = right_padded_mask([frames, 0, 5], frames)
    dout = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)
    ref = _run(attention_ref, q.double(), k.double(), v.double(), dout, key_padding_mask=mask)
    eager = _run(attention_ref, q, k, v, dout, key_padding_mask=mask)
    got = _run(_attention_triton, q, k, v, dout, key_padding_mask=mask)
    for name, g, e, r in zip(("out", "dq", "dk", "dv"), got, eager, ref):
        assert_within_2x_eager(name, g, e, r, FLOOR[dtype], scale="none")
    out, dq, dk, dv = got
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0)
    torch.testing.assert_close(out[1].double(), v[1].double().mean(0, keepdim=True).expand_as(out[1]),
                               atol=FLOOR[dtype] * 10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_empty_row_is_one_rule_on_every_backend_that_takes_it(dtype):
    """Issue 11: a batch row with no valid key gets the reference's value (transformers' additive-mask
    semantics: every score equal, a uniform average over all keys, no gradient to its q and k) on every
    backend that accepts the call: the eager backend (SDPA with a bool mask alone gave zeros) and cpp;
    triton and cuda refuse such rows in dispatch (their kernels, reached under torch.compile, are checked
    above). Rows with a valid key are unchanged by the rule: the eager backend gives them exactly what it
    gives them in a batch without the empty row. Output and gradients against fp64, with the 2x-eager rule
    measured against the reference in ``dtype``."""
    frames = 37
    q, k, v = make_qkv(3, frames, 2, 32, dtype)
    mask = right_padded_mask([frames, 0, 5], frames)
    head_mask = torch.tensor([1.0, 0.5], device=DEVICE)
    kw = dict(key_padding_mask=mask, head_mask=head_mask)
    dout = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)
    ref = _run(attention_ref, q.double(), k.double(), v.double(), dout, **kw)
    in_dtype = _run(attention_ref, q, k, v, dout, **kw)
    uniform = (v[1].double().mean(dim=0) * head_mask.double()[:, None]).expand(frames, -1, -1)
    ran = []
    for name in dispatch.implemented_backends()["attention"]:
        try:
            with dispatch.backend(name):
                got = _run(attention, q, k, v, dout, **kw)
        except uf.BackendNotSupportedError as e:
            assert name in ("triton", "cuda"), f"{name} refused: {e}"
            continue
        ran.append(name)
        for what, g, e, r in zip(("out", "dq", "dk", "dv"), got, in_dtype, ref):
            assert g.dtype == dtype
            assert_within_2x_eager(f"{name} {what}", g, e, r, FLOOR[dtype], scale="none")
        out, dq, dk, dv = got
        assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0), name
        torch.testing.assert_close(out[1].double(), uniform, atol=FLOOR[dtype] * 10, rtol=0)
    assert {"eager", "cpp"} <= set(ran), ran
    with torch.no_grad():
        with_empty, _ = _attention_eager(q, k, v, **kw)
        keep = torch.tensor([0, 2])
        without, _ = _attention_eager(q[keep], k[keep], v[keep], key_padding_mask=mask[keep], head_mask=head_mask)
    assert torch.equal(with_empty[keep], without)


# --------------------------------------------------------------------------------------------- dropout
def _one_hot_v(batch, frames, heads, dtype, device=DEVICE):
    # v[b, j, h, :] = e_j, so out[b, i, h, :] = row i of the (dropped, scaled) probability matrix.
    eye = torch.eye(frames, device=device, dtype=dtype)
    return eye[None, :, None, :].expand(batch, frames, heads, frames).contiguous()


def _dropout_case(dtype=torch.float32, device=DEVICE, frames=24):
    # head_dim = frames (the one-hot V recovers the mask), so frames <= 128.
    heads, p = 2, 0.3
    q, k, v = make_qkv(2, frames, heads, frames, dtype, device=device)
    mask = right_padded_mask([frames, 9 if frames < 40 else frames - 43], frames, device=device)
    head_mask = torch.tensor([1.0, 0.5], device=device)
    return q, k, v, dict(key_padding_mask=mask, head_mask=head_mask, dropout_p=p)


def test_dropout_zero_equals_no_dropout():
    q, k, v = make_qkv(2, 19, 2, 32, torch.float32)
    with dispatch.backend("triton"):
        a, _ = attention(q, k, v, dropout_p=0.0)
        b, _ = attention(q, k, v)
    assert torch.equal(a, b)


def test_dropout_same_seed_reproduces_and_other_seed_differs():
    q, k, v, kw = _dropout_case()
    dout = torch.randn(q.shape, device=DEVICE)
    with dispatch.backend("triton"):
        torch.manual_seed(123)
        first = _run(attention, q, k, v, dout, **kw)
        torch.manual_seed(123)
        again = _run(attention, q, k, v, dout, **kw)
        torch.manual_seed(124)
        other = _run(attention, q, k, v, dout, **kw)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for a, b in zip(first, other):
        assert not torch.equal(a, b)


def check_dropout_mask_and_gradients(q, k, v, kw):
    """Recover the dropped probabilities ``Pd = f * Z o P`` with a one-hot V (same seed, same q/k),
    then check: the zeroed fraction of valid entries is near p, kept entries equal ``P * m_h / (1-p)``,
    and the output and every gradient equal the fp64 reference with that exact mask."""
    batch, frames, heads, _ = q.shape
    p, mask, head_mask = kw["dropout_p"], kw["key_padding_mask"], kw["head_mask"]
    dout = torch.randn(q.shape, device=q.device, dtype=torch.float32)
    with dispatch.backend("triton"), torch.no_grad():
        torch.manual_seed(7)
        pd, _ = attention(q, k, _one_hot_v(batch, frames, heads, q.dtype, q.device), **kw)
    with dispatch.backend("triton"):
        torch.manual_seed(7)
        got = _run(attention, q, k, v, dout, **kw)
    pd = pd.double().permute(0, 2, 1, 3)  # [B, H, i, j]
    probs = attention_ref(q.double(), k.double(), v.double(), mask, need_weights=True)[1]
    valid = mask[:, None, None, :].expand_as(probs)
    kept = pd != 0
    assert not kept[~valid].any()
    dropped_fraction = 1.0 - kept[valid].double().mean().item()
    assert abs(dropped_fraction - p) < 0.05, dropped_fraction
    f = (head_mask.double() / (1.0 - p)).view(1, -1, 1, 1)
    tol = _DROPOUT_TOL[q.dtype]
    rel = (pd - probs * f).abs()[kept] / (probs * f)[kept]
    assert rel.max() < tol

    def dropped_ref(q_, k_, v_):
        scores = torch.einsum("bihd,bjhd->bhij", q_, k_) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1) * kept * f, v_), None

    ref = _run(dropped_ref, q.double(), k.double(), v.double(), dout.double())
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (g.double() - r).abs().max().item()
        assert err < tol * max(1.0, r.abs().max().item()), f"{name}: error {err:.3e} with the recovered dropout mask"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_mask_statistics_and_gradients(dtype):
    q, k, v, kw = _dropout_case(dtype)
    check_dropout_mask_and_gradients(q, k, v, kw)


# --------------------------------------------------------------------------------------------- torch.library
def _op_args(dropout):
    q, k, v = make_qkv(2, 5, 2, 16, torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    lengths = torch.tensor([5, 3], dtype=torch.int32, device=DEVICE)
    head_mask = torch.tensor([1.0, 0.5], device=DEVICE) if dropout else None
    seed = torch.tensor([42], dtype=torch.int64, device=DEVICE) if dropout else None
    return q, k, v, lengths, head_mask, seed, 0.25 if dropout else 0.0, 0.25


@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_forward(dropout):
    torch.library.opcheck(torch.ops.unispeech_fast.triton_attention_fwd.default, _op_args(dropout))


def test_opcheck_backward():
    q, k, v, lengths, head_mask, seed, p, scale = _op_args(True)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.unispeech_fast.triton_attention_fwd(q, k, v, lengths, head_mask, seed, p, scale)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.unispeech_fast.triton_attention_bwd.default,
                          (dout, q, k, v, lse, lengths, head_mask, seed, p, scale))


def test_torch_compile_fullgraph_matches_eager_call():
    """The registered triton backend function compiles with fullgraph=True (custom ops with fake
    implementations and autograd) and gives what the dispatched eager call gives, gradients included.
    It is compiled directly: dispatch's backend selection reads a ContextVar, which dynamo cannot trace."""
    q, k, v = make_qkv(2, 21, 2, 32, torch.float32)
    mask = right_padded_mask([21, 8], 21)
    head_mask = torch.tensor([1.0, 0.5], device=DEVICE)

    def fn(q, k, v):
        return _attention_triton(q, k, v, key_padding_mask=mask, head_mask=head_mask, scale=0.2)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dout = torch.randn(q.shape, device=DEVICE)
    with dispatch.backend("triton"):
        expected = _run(attention, q, k, v, dout, key_padding_mask=mask, head_mask=head_mask, scale=0.2)
    got = _run(lambda *a: compiled(*a), q, k, v, dout)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("backend,head_dim,served_by,log", [
    ("triton", 16, _attention_eager, "need_weights=True run the eager path"),
    ("cpp", 8, attention_ref, "need_weights=True run the eager reference"),
])
def test_need_weights_is_served_by_the_eager_path_and_logs(backend, head_dim, served_by, log, monkeypatch, caplog):
    """The triton and cpp kernels never materialise the probabilities: need_weights=True runs eager, logged once."""
    monkeypatch.setattr(dispatch.registry, "_logged_once", set())
    q, k, v = make_qkv(2, 9, 2, head_dim, torch.float32)
    mask = right_padded_mask([9, 4], 9)
    with dispatch.backend(backend), caplog.at_level(logging.WARNING, logger="unispeech_fast"):
        out, weights = attention(q, k, v, key_padding_mask=mask, need_weights=True)
    ref_out, ref_weights = served_by(q, k, v, key_padding_mask=mask, need_weights=True)
    assert torch.equal(out, ref_out) and torch.equal(weights, ref_weights)
    assert log in caplog.text


@pytest.mark.parametrize(
    "case,reason",
    [
        ("left_padded", "must be right-padded"),
        ("empty_row", "no valid frame"),
        ("head_dim_129", "head_dim must be in 1..128"),
        ("float64", "dtype must be float16, bfloat16 or float32"),
        ("dropout_one", "dropout_p must be in [0, 1)"),
        ("head_mask_grad", "gradient for head_mask"),
    ],
)
def test_not_supported_reasons(case, reason):
    q, k, v = make_qkv(2, 6, 2, 129 if case == "head_dim_129" else 8,
                       torch.float64 if case == "float64" else torch.float32)
    kw = {}
    if case == "left_padded":
        kw["key_padding_mask"] = right_padded_mask([6, 3], 6).flip(1)
    if case == "empty_row":
        kw["key_padding_mask"] = right_padded_mask([6, 0], 6)
    if case == "dropout_one":
        kw["dropout_p"] = 1.0
    if case == "head_mask_grad":
        kw["head_mask"] = torch.ones(2, device=DEVICE, requires_grad=True)
    with dispatch.backend("triton"), pytest.raises(uf.BackendNotSupportedError) as info:
        attention(q, k, v, **kw)
    assert reason in str(info.value)


def test_bf16_refused_under_the_interpreter_only():
    q, k, v = make_qkv(1, 4, 1, 16, torch.bfloat16)
    with dispatch.backend("triton"):
        if DEVICE == "cpu":
            with pytest.raises(uf.BackendNotSupportedError, match="interpreter"):
                attention(q, k, v)
        else:
            torch.testing.assert_close(attention(q, k, v)[0], _attention_eager(q, k, v)[0], atol=2e-2, rtol=2e-2)


def test_aot_variants_cover_the_launch_table():
    from unispeech_fast.kernels import attention as kern

    variants = kern.aot_variants()
    assert variants
    seen = {(v.fn.fn.__name__, v.constexprs.get("COMPUTE_DQ"), v.constexprs["BLOCK_M"], v.constexprs["BLOCK_N"],
             v.constexprs["BLOCK_D"], v.constexprs["HAS_HEAD_MASK"], v.constexprs["HAS_DROPOUT"], v.num_warps,
             v.num_stages, v.signature["Q"])
            for v in variants}
    kernels = {"fwd": ("_attn_fwd", None), "bwd_pre": ("_attn_bwd_rows", False), "bwd_kv": ("_attn_bwd_dkdv", None),
               "bwd_q": ("_attn_bwd_rows", True)}
    ptr = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
    for dtype in kern.DTYPES:
        for head_dim in (1, 16, 64, 65, 80, 128):
            block_d = kern.block_d_for(head_dim)
            for kernel, (name, compute_dq) in kernels.items():
                bm, bn, warps, stages = kern.config_for(dtype, head_dim, kernel, interpret=False)
                for hm in (False, True):
                    for drop in (False, True):
                        assert (name, compute_dq, bm, bn, block_d, hm, drop, warps, stages, ptr[dtype]) in seen
    with pytest.raises(ValueError, match="head_dim must be in 1..128"):
        kern.block_d_for(129)


# --------------------------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("frames", [499, 1500])
def test_real_sizes_gpu(dtype, frames):
    q, k, v = make_qkv(2, frames, 12, 64, dtype)
    mask = right_padded_mask([frames, frames // 3], frames)
    head_mask = torch.linspace(0.0, 1.5, 12, device=DEVICE)
    check_against_reference(q, k, v, key_padding_mask=mask, head_mask=head_mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [80, 128])
def test_head_dims_gpu(dtype, head_dim):
    q, k, v = make_qkv(2, 257, 4, head_dim, dtype)
    check_against_reference(q, k, v, key_padding_mask=right_padded_mask([257, 100], 257))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dropout_gpu(dtype):
    """113 frames (head dim 113 for the one-hot V): at the GPU block sizes (BLOCK_M 32..128, BLOCK_N 32..64)
    every kernel crosses several query or key blocks with a ragged tail, and row 1 (70 valid keys) ends
    inside a key block."""
    q, k, v, kw = _dropout_case(dtype, device="cuda", frames=113)
    check_dropout_mask_and_gradients(q, k, v, kw)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_beyond_46340_frames_gpu(dtype):
    """Past 46,340 frames, ``frames**2`` and ``pid_bh * frames`` leave int32: the kernels must use their int64
    offsets. 50,000 frames (two batch rows, one padded), checked against fp64 on sampled query rows (the
    reference for all rows would be an N x N matrix per head); gradients must be finite."""
    frames, heads = 50_000, 2
    q, k, v = make_qkv(2, frames, heads, 64, dtype)
    mask = right_padded_mask([frames, frames - 1234], frames)
    with dispatch.backend("triton"):
        qkv = torch.stack([q, k, v], dim=2).requires_grad_()
        out, _ = attention(*qkv.unbind(2), key_padding_mask=mask)
        out.float().square().sum().backward()
    assert torch.isfinite(qkv.grad).all()
    rows = torch.tensor([0, 1, 4097, 46_339, 46_340, 46_341, frames - 1235, frames - 1], device=DEVICE)
    for b in range(2):
        valid = mask[b]
        args = (q[b:b + 1, rows], k[b:b + 1, valid], v[b:b + 1, valid])
        expected = attention_ref(*(t.double() for t in args))[0]
        eager = attention_ref(*args)[0]
        got = out[b:b + 1, rows].detach()
        assert_within_2x_eager(f"row {b}", got, eager, expected, FLOOR[dtype], scale="none")


def test_padding_checks_run_once_per_encoder_forward(monkeypatch):
    """Issue 16 item 13: the kernels' padding check (two host syncs) and the mask's lengths are computed
    once per encoder forward, not once per layer; a new forward (or a changed mask) checks again."""
    import importlib

    attention_mod = importlib.import_module("unispeech_fast.ops.attention.padding")
    calls = []
    original = attention_mod.right_padded_lengths
    monkeypatch.setattr(attention_mod, "right_padded_lengths", lambda m: calls.append(1) or original(m))
    config = uf.UniSpeechSatConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=8,
                                   conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8),
                                   num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    model = uf.UniSpeechSatModel(config).eval()
    x = torch.randn(2, 400)
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, 250:] = 0
    with dispatch.backend("triton"), torch.no_grad():
        out = model(x, attention_mask=mask).last_hidden_state
        assert len(calls) == 1, f"{len(calls)} padding checks for 3 layers"
        model(x, attention_mask=mask)
        assert len(calls) == 2
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-4)
    # Outside a scope every call checks; inside one, a mask modified in place is checked again.
    kpm = right_padded_mask([6, 3], 6)
    q, k, v = make_qkv(2, 6, 2, 8, torch.float32)
    calls.clear()
    with attention_mod.padding_checked_once(kpm), dispatch.backend("triton"):
        attention(q, k, v, key_padding_mask=kpm)
        attention(q, k, v, key_padding_mask=kpm)
        assert len(calls) == 1
        kpm[1, 3] = True
        attention(q, k, v, key_padding_mask=kpm)
        assert len(calls) == 2


# --------------------------------------------------------------------------------------------- reference
def _attention_loop(q, k, v, mask, head_mask, scale):
    b, t, h, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            s = (q[bi, :, hi] @ k[bi, :, hi].T) * scale
            if mask is not None:
                s[:, ~mask[bi]] = float("-inf")
            p = torch.softmax(s, -1) * (1.0 if head_mask is None else head_mask[hi])
            out[bi, :, hi] = p @ v[bi, :, hi]
    return out


@pytest.mark.parametrize("t,h,d", [(1, 1, 8), (13, 2, 16), (67, 3, 64)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_head_mask", [False, True])
def test_reference_and_eager_against_loop(t, h, d, padded, with_head_mask):
    q, k, v = (torch.randn(2, t, h, d, dtype=torch.float64) for _ in range(3))
    mask = None
    if padded:
        mask = torch.ones(2, t, dtype=torch.bool)
        mask[1, max(1, t // 2):] = False
    head_mask = torch.rand(h, dtype=torch.float64) if with_head_mask else None
    expected = _attention_loop(q, k, v, mask, head_mask, d**-0.5)
    ref, _ = attention_ref(q, k, v, mask, head_mask)
    torch.testing.assert_close(ref, expected, atol=1e-12, rtol=0)
    eager, _ = attention(q, k, v, mask, head_mask)  # dispatch -> eager backend (SDPA)
    torch.testing.assert_close(eager, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eager_error_within_policy(dtype):
    """Tolerance policy baseline: the eager backend's error vs fp64 is within 2x the error of the
    plain-PyTorch reference in the same dtype (outputs and gradients)."""
    q, k, v = (torch.randn(2, 45, 2, 64, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[0, 30:] = False
    grad = torch.randn(2, 45, 2, 64, dtype=torch.float64)

    def run(fn, cast):
        qc, kc, vc = (x.detach().to(cast).requires_grad_() for x in (q, k, v))
        out, _ = fn(qc, kc, vc, mask)
        out.backward(grad.to(cast))
        return [out.double(), qc.grad.double(), kc.grad.double(), vc.grad.double()]

    gold = run(attention_ref, torch.float64)
    base = run(attention_ref, dtype)
    ours = run(attention, dtype)
    for g, b, o in zip(gold, base, ours):
        assert (o - g).abs().max() <= 2 * (b - g).abs().max() + 1e-5


# ============================================================================================ cuda backend
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _cuda_reasons(*args, **kwargs):
    """The cuda backend's reasons as registered: the base check of its declared capabilities plus its own."""
    return dispatch._REGISTRY["attention"]["cuda"].not_supported_reasons(*args, **kwargs)


def test_cuda_is_registered():
    assert "cuda" in dispatch.implemented_backends()["attention"]


def test_cuda_reasons_on_cpu():
    q, k, v = (torch.randn(2, 5, 2, 16, requires_grad=True) for _ in range(3))
    reasons = _cuda_reasons(q, k, v, dropout_p=0.1, need_weights=True)
    text = "\n".join(reasons)
    assert "CUDA tensors" in text and "cpu" in text
    assert "float16/bfloat16" in text and "torch.float32" in text
    assert "head_dim" in text and "16" in text
    assert "need_weights" in text and "dropout_p=0.1" in text
    assert "the CUDA attention has no backward; the triton backend serves training" in reasons
    if not _extension.status().has_cuda:
        assert any(r.startswith("CUDA extension not available") for r in reasons)
    with torch.no_grad():
        assert not any("no backward" in r for r in _cuda_reasons(q, k, v))


def test_cuda_reasons_check_masks():
    q, k, v = (torch.randn(2, 5, 3, 64, dtype=torch.float16) for _ in range(3))
    reasons = _cuda_reasons(q, k, v, torch.ones(2, 5), torch.ones(4))
    assert any("key_padding_mask must be bool [batch, frames]" in r for r in reasons)
    assert any("head_mask must be [heads]" in r for r in reasons)


def test_cuda_reasons_refuse_grad_head_mask_and_empty_rows():
    """Issue 16 items 1 and 10: a head_mask that requires grad is refused (the op has no backward), and the
    kernel backends share one mask check that refuses left padding and rows without a valid key."""
    from unispeech_fast.ops.attention import padding_mask_reasons

    q, k, v = (torch.randn(2, 5, 2, 64, dtype=torch.float16) for _ in range(3))
    head_mask = torch.ones(2, requires_grad=True)
    assert any("head_mask requires grad" in r for r in _cuda_reasons(q, k, v, None, head_mask))
    with torch.no_grad():
        assert not any("head_mask" in r for r in _cuda_reasons(q, k, v, None, head_mask))
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


def test_cuda_row_rules_match_the_reference_in_fp64():
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


def test_cuda_forced_on_cpu_raises_with_reasons():
    q, k, v = (torch.randn(1, 3, 2, 64) for _ in range(3))
    with dispatch.backend("cuda"), pytest.raises(dispatch.BackendNotSupportedError, match="backend 'cuda' cannot run"):
        attention(q, k, v)


def test_cuda_right_padded_lengths_give_the_seqlens():
    from unispeech_fast.ops.attention import right_padded_lengths

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert right_padded_lengths(mask).tolist() == [3, 4, 0]
    assert right_padded_lengths(mask).dtype == torch.int32
    assert right_padded_lengths(torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)) is None
    assert right_padded_lengths(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)) is None


def _lengths(batch: int, seq: int) -> list[int]:
    return [seq, max(1, seq // 2), max(1, seq - 5)][:batch]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq", [1, 17, 64, 127, 273])
def test_cuda_matches_reference(cuda_ops, dtype, head_dim, seq):
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
    _assert_close("attention (no masks)", cuda_ops.attention_fwd(q, k, v, None, None, head_dim ** -0.5),
                  attention_ref(q, k, v)[0], attention_ref(q.double(), k.double(), v.double())[0])
    _assert_close("attention (scale 0.3)", cuda_ops.attention_fwd(q, k, v, None, None, 0.3),
                  attention_ref(q, k, v, scale=0.3)[0], attention_ref(q.double(), k.double(), v.double(), scale=0.3)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cuda_strided_views_and_unaligned(cuda_ops, dtype):
    batch, seq, heads, head_dim = 2, 77, 3, 64
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=dtype)  # fused projection layout
    q, k, v = qkv.unbind(2)
    eager = attention_ref(q, k, v)[0]
    ref = attention_ref(q.double(), k.double(), v.double())[0]
    _assert_close("attention (fused qkv views)", cuda_ops.attention_fwd(q, k, v, None, None, head_dim ** -0.5), eager,
                  ref)
    buf = torch.randn(3, batch, seq, heads, head_dim + 1, device="cuda", dtype=dtype)
    q, k, v = buf[..., 1:].unbind(0)  # not 16-byte aligned: the scalar load path
    eager = attention_ref(q, k, v)[0]
    ref = attention_ref(q.double(), k.double(), v.double())[0]
    _assert_close("attention (unaligned)", cuda_ops.attention_fwd(q, k, v, None, None, head_dim ** -0.5), eager, ref)


@pytest.mark.gpu
def test_cuda_zero_length_row_attends_uniformly(cuda_ops):
    batch, seq, heads, head_dim = 2, 40, 2, 64
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = torch.zeros(batch, seq, dtype=torch.bool, device="cuda")
    mask[1, :7] = True
    ref = attention_ref(q.double(), k.double(), v.double(), mask)[0]
    eager = attention_ref(q, k, v, mask)[0]
    seqlens = torch.tensor([0, 7], dtype=torch.int32, device="cuda")
    _assert_close("attention (length 0)", cuda_ops.attention_fwd(q, k, v, seqlens, None, head_dim ** -0.5), eager, ref)
    # Issue 16 item 4: NaN in the padded keys/values of row 1 (inside its only key block) stays out.
    k[1, 7:], v[1, 7:] = float("nan"), float("nan")
    out = cuda_ops.attention_fwd(q, k, v, seqlens, None, head_dim ** -0.5)
    _assert_close("attention (NaN padding)", out[1], eager[1], ref[1])


@pytest.mark.gpu
def test_cuda_refuses_training_and_bad_inputs(cuda_ops):
    q, k, v = (torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    no_backward = "the CUDA attention has no backward; the triton backend serves training"
    assert no_backward in _cuda_reasons(q, k, v)
    left_padded = torch.tensor([[False] * 3 + [True] * 5], device="cuda")
    with torch.no_grad():
        assert _cuda_reasons(q, k, v) == []
        assert any("right-padded" in r for r in _cuda_reasons(q, k, v, left_padded))
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        cuda_ops.attention_fwd(q[..., :32], k[..., :32], v[..., :32], None, None, 1.0)
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16"):
        cuda_ops.attention_fwd(q.float(), k.float(), v.float(), None, None, 1.0)


# ============================================================================================ cpp backend
OPS = torch.ops.unispeech_fast if ext.ensure_registered() else None


def test_cpp_kernel_is_registered_for_cpu():
    assert ext.ensure_registered()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("unispeech_fast::attention_fwd", "CPU")
    assert "cpp" in dispatch.implemented_backends()["attention"]


def test_cpp_a_stale_extension_without_the_kernel_is_a_reason(monkeypatch):
    """Issue 15 item 6: where the loaded extension has no CPU kernel for ``attention_fwd`` (one built before the
    op existed), the cpp backend reports it instead of failing in the dispatcher: forced, one error names the
    kernel; auto takes another backend."""
    from unispeech_fast import _extension

    monkeypatch.setattr(_extension, "has_kernel", lambda op, device: op != "attention_fwd")
    q = torch.randn(1, 5, 2, 8)
    with torch.no_grad():
        with dispatch.backend("cpp"), pytest.raises(uf.BackendNotSupportedError, match="no CPU kernel for attention_fwd"):
            attention(q, q, q)
        out, _ = attention(q, q, q)
    torch.testing.assert_close(out, attention_ref(q, q, q)[0], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frames", [1, 7, 129, 1000])
def test_cpp_matches_reference(dtype, frames):
    q, k, v = make_qkv(2, frames, 2, 64, dtype)
    check_against_reference(q, k, v, backend="cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frames", [7, 129, 1000])
def test_cpp_padding_and_head_mask(dtype, frames):
    """Valid lengths of 1, a non-multiple of the key block and full; a head mask with a zero and a
    non-binary value; a non-default scale."""
    lengths = [frames, 1, max(1, frames - 3 * frames // 4)]
    q, k, v = make_qkv(3, frames, 2, 64, dtype)
    mask = right_padded_mask(lengths, frames)
    head_mask = torch.tensor([0.0, 0.7])
    out, dq, dk, dv = check_against_reference(q, k, v, backend="cpp", key_padding_mask=mask, head_mask=head_mask,
                                              scale=0.11)
    assert torch.all(out[:, :, 0] == 0) and torch.all(dq[:, :, 0] == 0) and torch.all(dv[:, :, 0] == 0)
    assert torch.all(dk[~mask] == 0) and torch.all(dv[~mask] == 0)  # padded keys get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [1, 16, 17, 80])
def test_cpp_other_head_dims(head_dim, dtype):
    """Head dims that are not a multiple of the 16-lane vectors (1, 17, 80) or odd (bf16 pairs them along
    the reduction), with valid lengths across and just past a key block (257) and below one vector (9)."""
    q, k, v = make_qkv(3, 300, 3, head_dim, dtype)
    check_against_reference(q, k, v, backend="cpp", key_padding_mask=right_padded_mask([300, 257, 9], 300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_same_bits_for_any_thread_count(dtype):
    """Each (batch, head, query block) is one task whatever the thread count, and the K / V packing a thread
    keeps is per (batch, head): 1, 2 and 3 threads (different task ranges per thread, so different reuse of
    the packing, across rows of different lengths and an empty row) give the same bits."""
    q, k, v = make_qkv(4, 700, 3, 64, dtype)
    mask = right_padded_mask([700, 0, 301, 5], 700)
    head_mask = torch.tensor([1.0, 0.0, 0.5])
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with dispatch.backend("cpp"), torch.no_grad():
                outs.append(attention(q, k, v, key_padding_mask=mask, head_mask=head_mask)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    ref, _ = attention_ref(q.double(), k.double(), v.double(), key_padding_mask=mask, head_mask=head_mask.double())
    torch.testing.assert_close(outs[0].double(), ref, atol={torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype], rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_cpp_fully_padded_row_attends_uniformly(dtype, tol):
    """A batch row with no valid key: the reference's masked_fill(finfo.min) makes every score equal, so the
    row attends to all keys uniformly; the kernel matches that (output and gradients), to the precision of
    each dtype (fp64 included, which the 2x-eager rule of the test over every backend does not reach)."""
    frames = 300
    q, k, v = make_qkv(2, frames, 2, 32, dtype)
    mask = right_padded_mask([frames, 0], frames)
    head_mask = torch.tensor([1.0, 0.5])
    dout = torch.randn(q.shape, dtype=torch.float64)
    ref = _run(attention_ref, q.double(), k.double(), v.double(), dout, key_padding_mask=mask, head_mask=head_mask)
    with dispatch.backend("cpp"):
        got = _run(attention, q, k, v, dout, key_padding_mask=mask, head_mask=head_mask)
    uniform = v[1].double().mean(dim=0) * head_mask.double()[:, None]  # [heads, head_dim]
    torch.testing.assert_close(got[0][1].double(), uniform.expand(frames, -1, -1), atol=tol, rtol=0)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (g.double() - r).abs().max().item()
        assert err <= tol * max(1.0, r.abs().max().item()), f"{name}: error {err:.3e}"


def test_cpp_fp64_matches_reference_to_fp64_precision():
    q, k, v = make_qkv(2, 129, 2, 64, torch.float64)
    mask = right_padded_mask([129, 70], 129)
    dout = torch.randn(q.shape, dtype=torch.float64)
    ref = _run(attention_ref, q, k, v, dout, key_padding_mask=mask)
    with dispatch.backend("cpp"):
        got = _run(attention, q, k, v, dout, key_padding_mask=mask)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("frames,lengths", [(1, None), (7, [7, 3]), (129, [129, 1]), (1000, [1000, 517])])
def test_cpp_backward_is_the_cpp_kernel_in_fp32(frames, lengths, monkeypatch):
    """Issue 11 item 4: float32 gradients under backend("cpp") come from the C++ backward (attention_bwd, which
    recomputes P from the row logsumexp), not from the SDPA recomputation (made to fail here), within the
    2x-eager rule against fp64, with key padding, a head mask (not requiring grad) and a non-default scale."""
    from unispeech_fast.ops.attention import extension as cpp_module

    assert _attention_cpp._cpp_backward_runs(torch.ones(1), (True, True, True, False, False, False))

    def no_sdpa(*args, **kwargs):
        raise AssertionError("the SDPA recomputation ran instead of attention_bwd")

    q, k, v = make_qkv(2, frames, 3, 64, torch.float32)
    kw = dict(head_mask=torch.tensor([1.0, 0.0, 0.6]), scale=0.2)
    if lengths is not None:
        kw["key_padding_mask"] = right_padded_mask(lengths, frames)
    dout = torch.randn(q.shape, dtype=torch.float64)
    ref = _run(attention_ref, q.double(), k.double(), v.double(), dout, **kw)
    eager = _run(_attention_eager, q, k, v, dout, **kw)
    monkeypatch.setattr(cpp_module.F, "scaled_dot_product_attention", no_sdpa)
    with dispatch.backend("cpp"):
        got = _run(attention, q, k, v, dout, **kw)
    for name, g, e, r in zip(("out", "dq", "dk", "dv"), got, eager, ref):
        assert_within_2x_eager(name, g, e, r, FLOOR[torch.float32], scale="none")


def test_cpp_backward_kernel_opcheck_and_errors():
    q, k, v = make_qkv(2, 33, 2, 16, torch.float32)
    out = OPS.attention_fwd(q, k, v, None, None, 0.25)
    lens = torch.tensor([33, 0], dtype=torch.int32)
    args = (torch.randn(q.shape), q, k, v, out, lens, torch.tensor([1.0, 0.5]), 0.25)
    torch.library.opcheck(OPS.attention_bwd, args)
    with pytest.raises(RuntimeError, match="attention_bwd: grad_out must be float32 or float64"):
        OPS.attention_bwd(*(t.bfloat16() for t in args[:5]), None, None, 0.25)
    with pytest.raises(RuntimeError, match="attention_bwd: out must have the shape of q"):
        OPS.attention_bwd(args[0], q, k, v, out[:, :5], None, None, 0.25)
    with pytest.raises(RuntimeError, match=r"attention_bwd: seqlens\[0\] must be in \[0, 33\]"):
        OPS.attention_bwd(*args[:5], torch.tensor([34, 1], dtype=torch.int32), None, 0.25)


def test_cpp_head_mask_gradient():
    q, k, v = make_qkv(2, 40, 3, 16, torch.float32)
    hm = torch.tensor([1.0, 0.3, 0.0])

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, hm)]
        out, _ = fn(*leaves[:3], key_padding_mask=right_padded_mask([40, 33], 40), head_mask=leaves[3])
        out.backward(torch.ones_like(out))
        return leaves[3].grad

    ref = grads(attention_ref, torch.float64)
    with dispatch.backend("cpp"):
        got = grads(attention, torch.float32)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_cpp_layouts_are_read_in_place_or_copied():
    """Strided views of one fused projection, a contiguous copy, and a last dim with stride != 1 agree."""
    q, k, v = make_qkv(2, 50, 3, 16, torch.float32)
    with dispatch.backend("cpp"):
        views, _ = attention(q, k, v)
        dense, _ = attention(q.contiguous(), k.contiguous(), v.contiguous())
        flipped = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
        strided, _ = attention(*flipped)
    assert torch.equal(views, dense) and torch.equal(views, strided)
    torch.testing.assert_close(views, attention_ref(q, k, v)[0], atol=2e-6, rtol=1e-5)


def test_cpp_empty_inputs():
    q, k, v = make_qkv(2, 0, 2, 8, torch.float32)
    with dispatch.backend("cpp"):
        out, _ = attention(q, k, v)
    assert out.shape == (2, 0, 2, 8)


# --------------------------------------------------------------------------------------------- refusals
def test_cpp_reasons():
    q, k, v = make_qkv(2, 9, 2, 8, torch.float32)
    reasons = _attention_cpp._cpp_reasons
    assert reasons(q, k, v) == []
    assert any("no dropout" in r for r in reasons(q, k, v, dropout_p=0.1))
    left_padded = ~right_padded_mask([9, 4], 9)
    left_padded[0] = True
    assert any("right-padded" in r for r in reasons(q, k, v, key_padding_mask=left_padded))
    assert any("bool [batch, frames]" in r for r in reasons(q, k, v, key_padding_mask=torch.ones(2, 9)))
    assert any("head_mask" in r for r in reasons(q, k, v, head_mask=torch.ones(3)))
    assert any("float32, bfloat16" in r for r in reasons(q.int(), k.int(), v.int()))
    assert any("one [batch, frames, heads, head_dim] shape" in r for r in reasons(q, k[:, :5], v))
    with dispatch.backend("cpp"), pytest.raises(uf.BackendNotSupportedError, match="right-padded"):
        attention(q, k, v, key_padding_mask=left_padded)


def test_cpp_auto_takes_cpp_for_inference_only(monkeypatch):
    """Auto skips the C++ attention where gradients are needed (its backward is not measured faster than
    eager's); a forced backend("cpp") still trains through it."""
    monkeypatch.setattr(dispatch.selection, "_MEASURED_ORDERS", {})  # the default order: cpp before eager
    q, k, v = make_qkv(2, 9, 2, 8, torch.float32)
    grad_inputs = {"q": q.clone().requires_grad_(), "k": k, "v": v}
    assert dispatch.select("attention", {"q": q, "k": k, "v": v}).backend == "cpp"
    assert dispatch.select("attention", grad_inputs).backend == "eager"
    assert any("not measured faster than eager's" in r for r in _attention_cpp._cpp_reasons(**grad_inputs))
    with torch.no_grad():
        assert dispatch.select("attention", grad_inputs).backend == "cpp"
    with dispatch.backend("cpp"):
        assert dispatch.select("attention", grad_inputs).backend == "cpp"


def test_cpp_kernel_errors_name_the_argument():
    q, k, v = make_qkv(2, 9, 2, 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"seqlens\[1\] must be in \[0, 9\]"):
        OPS.attention_fwd(q, k, v, torch.tensor([9, 10], dtype=torch.int32), None, 1.0)
    with pytest.raises(RuntimeError, match="seqlens must be int32"):
        OPS.attention_fwd(q, k, v, torch.tensor([9, 9]), None, 1.0)
    with pytest.raises(RuntimeError, match=r"head_mask must be \[2\]"):
        OPS.attention_fwd(q, k, v, None, torch.ones(3), 1.0)
    with pytest.raises(RuntimeError, match=r"v must have the dtype of q"):
        OPS.attention_fwd(q, k, v.double(), None, None, 1.0)
    with pytest.raises(RuntimeError, match=r"k must have the shape of q"):
        OPS.attention_fwd(q, k[:, :3], v, None, None, 1.0)
    with pytest.raises(RuntimeError, match=r"q must have a contiguous last dim"):
        OPS.attention_fwd(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, None, None, 1.0)


# --------------------------------------------------------------------------------------------- custom op
def _cpp_opcheck_cases():
    q, k, v = (t.contiguous() for t in make_qkv(2, 33, 2, 16, torch.float32))
    lens = torch.tensor([33, 0], dtype=torch.int32)
    hm = torch.tensor([0.5, 1.0])
    fused = torch.randn(2, 21, 3, 2, 16)
    return [
        (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lens, hm.requires_grad_(), 0.25),
        (q.detach(), k.detach(), v.detach(), None, None, 0.25),
        (*fused.unbind(2), torch.tensor([21, 5], dtype=torch.int32), None, 0.3),
        (q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(), lens, hm.detach(), 0.25),
    ]


@pytest.mark.parametrize("case", range(4))
def test_cpp_opcheck(case):
    torch.library.opcheck(OPS.attention_fwd.default, _cpp_opcheck_cases()[case])


def test_cpp_torch_compile_fullgraph():
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(2, 70, 2, 16, torch.float32))
    mask = right_padded_mask([70, 41], 70)
    hm = torch.tensor([1.0, 0.5])

    def f(q, k, v):
        return _attention_cpp.attention_cpp(q, k, v, key_padding_mask=mask, head_mask=hm)[0]

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    got.square().sum().backward()
    got_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = attention_ref(q, k, v, key_padding_mask=mask, head_mask=hm)[0]
    want.square().sum().backward()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    for g, t in zip(got_grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- models
NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                     layerdrop=0.0, mask_time_prob=0.0, final_dropout=0.0)


@pytest.mark.parametrize("family,head,norm", [
    ("UniSpeech", "ForCTC", "group"),
    ("UniSpeechSat", "Model", "layer"),
    ("UniSpeechSat", "ForXVector", "group"),
])
def test_cpp_whole_model_under_cpp_equals_eager(family, head, norm, monkeypatch):
    """``backend("cpp")`` runs every op of a model's inference (fp32) on the C++ kernels, attention
    included, with a padded batch and a per-layer head mask, and matches eager."""
    config = getattr(uf, family + "Config")(**tiny_config_kwargs(
        family, **NO_RANDOMNESS, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer"))
    model = getattr(uf, family + head)(config).eval()
    x, mask = padded_batch([1400, 1100])
    head_mask = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    calls = []
    impl = dispatch._REGISTRY["attention"]["cpp"]

    def counting(**kw):
        calls.append(1)
        return impl.fn(**kw)

    monkeypatch.setitem(dispatch._REGISTRY["attention"], "cpp", dataclasses.replace(impl, fn=counting))
    with torch.no_grad():
        with uf.backend("eager"):
            ref = model(x, attention_mask=mask, head_mask=head_mask)
        with uf.backend("cpp"):
            out = model(x, attention_mask=mask, head_mask=head_mask)
    assert len(calls) == config.num_hidden_layers
    for key, value in ref.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(out[key], value, atol=2e-5, rtol=2e-5, msg=key)
