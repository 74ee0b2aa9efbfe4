"""The C++ CPU ops of ``unispeech_fast._C`` (the ``cpp`` backend) against the eager references.

Tolerance policy: a kernel's max error against an fp64 reference is at most 2x the eager fp32 op's
error against the same reference (plus a tiny floor), for outputs and every gradient; fp64 runs are
compared with the fp64 eager reference at fp64 precision.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import unispeech_fast as uf
from unispeech_fast import _extension, dispatch
from _tolerance import FLOOR, assert_within_2x_eager, max_err
from unispeech_fast.ops import _extension_ops as ext
from unispeech_fast.ops.feature_extractor import extension as fe_ext
from unispeech_fast.ops.gumbel_quantizer import extension as gq_ext
from unispeech_fast.ops.pos_conv import extension as pc_ext
from unispeech_fast.ops.feature_extractor import feature_extractor_ref
from unispeech_fast.ops.gumbel_quantizer import gumbel_quantizer_ref
from unispeech_fast.ops.pos_conv import pos_conv_ref
from conftest import padded_batch, tiny_config_kwargs

OPS = torch.ops.unispeech_fast if ext.ensure_registered() else None  # fakes + autograd registered


def test_extension_is_built_and_registered():
    status = _extension.status()
    assert status.loaded, status.reason
    assert ext.ensure_registered()
    for name in ("pos_conv_fwd", "pos_conv_bwd", "conv_norm_gelu_fwd", "gumbel_quantizer_fwd", "gumbel_quantizer_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"unispeech_fast::{name}", "CPU"), name


# ---------------------------------------------------------------------------------------------- helpers
def _assert_policy(ours, eager32, ref64, what):
    """ours (fp32) against the fp64 reference: the shared rule (tests/_tolerance.py) with fp32's floor."""
    assert_within_2x_eager(what, ours, eager32, ref64, FLOOR[torch.float32])


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in tensors]


def _run_with_grads(fn, inputs, grad_out_seed=1):
    out = fn(*inputs)
    g = torch.Generator().manual_seed(grad_out_seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    out.backward(gout)
    return out, [None if t is None else t.grad for t in inputs]


# ---------------------------------------------------------------------------------------------- pos_conv
POS_CONV_SHAPES = [  # batch, frames, hidden, groups, kernel
    (1, 1, 16, 2, 4),
    (2, 7, 12, 3, 5),
    (1, 13, 32, 4, 16),
    (2, 37, 24, 1, 3),
    (1, 61, 768, 16, 128),
]


def _pos_conv_inputs(b, t, h, groups, k, dtype=torch.float32):
    x = torch.randn(b, t, h)
    v = torch.randn(h, h // groups, k) * (h // groups * k) ** -0.5
    g = torch.rand(1, 1, k) + 0.5
    bias = torch.randn(h) * 0.1
    return [t_.to(dtype) for t_ in (x, g, v, bias)]


@pytest.mark.parametrize("shape", POS_CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pos_conv_matches_reference_fp32(shape):
    b, t, h, groups, k = shape
    inputs = _pos_conv_inputs(*shape)

    def run(impl, dtype):
        x, g, v, bias = _leaves(inputs, dtype)
        return _run_with_grads(lambda *a: impl(*a, groups=groups), [x, g, v, bias])

    ours, ours_g = run(pc_ext.pos_conv_ext, torch.float32)
    eager, eager_g = run(pos_conv_ref, torch.float32)
    ref, ref_g = run(pos_conv_ref, torch.float64)
    _assert_policy(ours, eager, ref, "out")
    for name, o, e, r in zip(("x", "weight_g", "weight_v", "bias"), ours_g, eager_g, ref_g):
        _assert_policy(o, e, r, f"grad {name}")


@pytest.mark.parametrize("shape", POS_CONV_SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_pos_conv_fp64_and_no_bias(shape):
    b, t, h, groups, k = shape
    x, g, v, _ = _leaves(_pos_conv_inputs(*shape, dtype=torch.float64), torch.float64)
    ours, ours_g = _run_with_grads(lambda *a: pc_ext.pos_conv_ext(*a, None, groups), [x, g, v])
    x2, g2, v2 = _leaves([x, g, v], torch.float64)
    ref, ref_g = _run_with_grads(lambda *a: pos_conv_ref(*a, None, groups), [x2, g2, v2])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for o, r in zip(ours_g, ref_g):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-10)


def test_pos_conv_without_grad_saves_no_preact_and_refuses_backward():
    x, g, v, bias = _pos_conv_inputs(1, 5, 8, 2, 3)
    weight = torch._weight_norm(v, g, 2)
    out, preact = OPS.pos_conv_fwd(x, weight, bias, 2, False)
    assert preact.numel() == 0
    torch.testing.assert_close(out, pos_conv_ref(x, g, v, bias, 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="preact is empty"):
        OPS.pos_conv_bwd(torch.ones_like(x), x, weight, preact, 2, True)


# ---------------------------------------------------------------------------------------------- conv_norm_gelu
CNG_CASES = [  # batch, C_in, T_in, C_out, kernel, stride, norm_kind
    (2, 1, 10, 8, 10, 5, 2),  # one output frame
    (2, 1, 263, 16, 10, 5, 1),
    (2, 3, 97, 5, 3, 2, 2),
    (1, 7, 130, 11, 2, 2, 0),
    (2, 4, 300, 6, 3, 1, 1),  # several time tiles, stride 1
    (1, 512, 171, 512, 3, 2, 0),
]


def _cng_inputs(b, cin, tin, cout, k, stride, kind, dtype=torch.float32):
    x = torch.randn(b, cin, tin)
    w = torch.randn(cout, cin, k) * (cin * k) ** -0.5
    bias = torch.randn(cout) * 0.1
    nw = 1 + 0.1 * torch.randn(cout) if kind else None
    nb = 0.1 * torch.randn(cout) if kind else None
    return [None if t is None else t.to(dtype) for t in (x, w, bias, nw, nb)]


@pytest.mark.parametrize("case", CNG_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv_norm_gelu_matches_reference(case):
    *_, stride, kind = case
    inputs = _cng_inputs(*case)

    def run(fn, dtype):
        leaves = _leaves(inputs, dtype)
        return _run_with_grads(lambda *a: fn(*a, stride, kind, 1e-5), leaves)

    def ours_fn(*a):
        return OPS.conv_norm_gelu_fwd(*a)

    ours, ours_g = run(ours_fn, torch.float32)
    eager, eager_g = run(fe_ext.conv_norm_gelu_eager, torch.float32)
    ref, ref_g = run(fe_ext.conv_norm_gelu_eager, torch.float64)
    _assert_policy(ours, eager, ref, "out")
    for name, o, e, r in zip(("x", "weight", "bias", "norm_weight", "norm_bias"), ours_g, eager_g, ref_g):
        if r is not None:
            _assert_policy(o, e, r, f"grad {name}")
    ours64 = OPS.conv_norm_gelu_fwd(*[None if t is None else t.double() for t in inputs], stride, kind, 1e-5)
    torch.testing.assert_close(ours64, ref.detach(), rtol=1e-10, atol=1e-10)


def _stack_params(norm_type, channels, kernels, dtype=torch.float32):
    ws, bs, nws, nbs = [], [], [], []
    cin = 1
    for i, (c, k) in enumerate(zip(channels, kernels)):
        ws.append(torch.randn(c, cin, k, dtype=dtype) * (cin * k) ** -0.5)
        bs.append(torch.randn(c, dtype=dtype) * 0.1)
        has_norm = norm_type == "layer" or i == 0
        nws.append(1 + 0.1 * torch.randn(c, dtype=dtype) if has_norm else None)
        nbs.append(0.1 * torch.randn(c, dtype=dtype) if has_norm else None)
        cin = c
    return ws, bs, nws, nbs


@pytest.mark.parametrize("norm_type", ["group", "layer"])
def test_feature_extractor_real_size(norm_type):
    """transformers' default stack (512 channels, kernels 10,3,3,3,3,2,2, strides 5,2,...) on 1 s of audio."""
    kernels, strides = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    params = _stack_params(norm_type, (512,) * 7, kernels)
    x = torch.randn(1, 16000)
    ours = fe_ext.feature_extractor_ext(x, *params, strides, norm_type)
    eager = feature_extractor_ref(x, *params, strides, norm_type)
    params64 = [[None if t is None else t.double() for t in p] for p in params]
    ref = feature_extractor_ref(x.double(), *params64, strides, norm_type)
    assert ours.shape == ref.shape == (1, 512, 49)
    _assert_policy(ours, eager, ref, "features")


@pytest.mark.parametrize("norm_type", ["group", "layer"])
def test_feature_extractor_grads_small(norm_type):
    kernels, strides = (10, 3, 2), (5, 2, 2)
    params = _stack_params(norm_type, (8, 6, 5), kernels)
    flat = [t for p in params for t in p]

    def run(fn, dtype):
        x = torch.randn(2, 211, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
        leaves = _leaves(flat, dtype)
        n = len(kernels)
        ws, bs, nws, nbs = (leaves[i * n:(i + 1) * n] for i in range(4))
        out, _ = _run_with_grads(lambda x_: fn(x_, ws, bs, nws, nbs, strides, norm_type), [x])
        return out, [x.grad] + [t.grad for t in leaves if t is not None]

    ours, ours_g = run(fe_ext.feature_extractor_ext, torch.float32)
    eager, eager_g = run(feature_extractor_ref, torch.float32)
    ref, ref_g = run(feature_extractor_ref, torch.float64)
    _assert_policy(ours, eager, ref, "out")
    for i, (o, e, r) in enumerate(zip(ours_g, eager_g, ref_g)):
        _assert_policy(o, e, r, f"grad {i}")


# ---------------------------------------------------------------------------------------------- gumbel
GUMBEL_SHAPES = [(1, 1, 2, 5, 6), (2, 7, 2, 13, 8), (3, 17, 1, 320, 256), (1, 41, 2, 320, 384)]  # B, T, G, V, D


def _gumbel_inputs(b, t, groups, v, d, dtype=torch.float32):
    logits = torch.randn(b, t, groups * v, dtype=dtype) * 2
    codevectors = torch.randn(1, groups * v, d // groups, dtype=dtype)
    return logits, codevectors


@pytest.mark.parametrize("shape", GUMBEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gumbel_eval_matches_reference(shape, dtype):
    b, t, groups, v, d = shape
    logits, cv = _gumbel_inputs(*shape, dtype=dtype)
    cv.requires_grad_()
    q, perp = gq_ext.gumbel_quantizer_ext(logits, cv, groups, 2.0, False)
    q_ref_in = cv.detach().clone().requires_grad_()
    q_ref, perp_ref = gumbel_quantizer_ref(logits, q_ref_in, groups, 2.0, False)
    assert perp.dtype == perp_ref.dtype and q.dtype == q_ref.dtype
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(perp, perp_ref)
    gq = torch.randn_like(q)
    q.backward(gq)
    q_ref.backward(gq)
    torch.testing.assert_close(cv.grad, q_ref_in.grad)


@pytest.mark.parametrize("shape", GUMBEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gumbel_sample_follows_eager_rng_and_gradients(shape):
    b, t, groups, v, d = shape
    logits, cv = _gumbel_inputs(*shape)

    def run(fn):
        lg, c = logits.clone().requires_grad_(), cv.clone().requires_grad_()
        torch.manual_seed(1234)
        q, perp = fn(lg, c, groups, 0.7, True)
        gq = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
        ((q * gq).sum() + 3.0 * perp).backward()
        return q, perp, lg.grad, c.grad

    ours = run(gq_ext.gumbel_quantizer_ext)
    eager = run(gumbel_quantizer_ref)
    # Same noise, same codes: the quantized rows are the same codevectors (eager's straight-through
    # one-hot is 1 - s + s, within an ulp of 1).
    torch.testing.assert_close(ours[0], eager[0], rtol=1e-6, atol=1e-7)
    assert ours[1].dtype == eager[1].dtype == torch.float32
    torch.testing.assert_close(ours[1], eager[1], rtol=1e-5, atol=1e-6)
    # The fp64 reference with the same noise (F.gumbel_softmax's draw: float32 [B*T*G, V] from torch's RNG).
    torch.manual_seed(1234)
    noise = -torch.empty(b * t * groups, v).exponential_().log()
    lg, c = logits.double().requires_grad_(), cv.double().requires_grad_()
    q64, perp64 = gumbel_quantizer_ref(lg, c, groups, 0.7, True, gumbels=noise.view(b, t, groups * v).double())
    gq = torch.randn(q64.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32).double()
    ((q64 * gq).sum() + 3.0 * perp64).backward()
    for got, want, ref, what in ((ours[2], eager[2], lg.grad, "grad logits"), (ours[3], eager[3], c.grad,
                                                                                 "grad codevectors")):
        assert_within_2x_eager(what, got, want, ref, FLOOR[torch.float32])


@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize("shape", [(3, 17, 1, 320), (1, 41, 2, 320), (4, 50, 2, 320), (2, 7, 2, 13)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gumbel_soft_within_twice_eager_error(shape, temperature):
    """The stored ``soft = softmax((l + n) / tau)`` (the logits gradient's factor). A serial float sum and a
    multiplication by 1/sum gave about 4x eager's error against fp64 over 320 codes; no floor here, so a
    constant factor above 2 fails (eager's own error is some 1e-7 at these sizes, never 0)."""
    b, t, groups, v = shape
    logits, cv = _gumbel_inputs(b, t, groups, v, 2 * groups)
    flat = logits.view(b * t, groups * v)
    noise = -torch.empty(b * t, groups * v).exponential_().log()
    soft = OPS.gumbel_quantizer_fwd(flat, cv.view(groups * v, 2), groups, temperature, True, noise, 0, 0)[2]
    eager = ((flat + noise) / temperature).view(b * t, groups, v).softmax(-1)
    ref = ((flat.double() + noise.double()) / temperature).view(b * t, groups, v).softmax(-1)
    assert max_err(eager, ref) > 0
    assert_within_2x_eager("soft", soft, eager, ref, floor=0.0)


def test_gumbel_sample_needs_noise_on_cpu():
    logits, cv = _gumbel_inputs(1, 3, 2, 5, 4)
    with pytest.raises(RuntimeError, match="gumbels is required"):
        OPS.gumbel_quantizer_fwd(logits.view(3, 10), cv.view(10, 2), 2, 1.0, True, None, 0, 0)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 5, 8)
    w = torch.randn(8, 4, 3)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        OPS.pos_conv_fwd(x.half(), w.half(), None, 2, False)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        OPS.pos_conv_fwd(x.transpose(0, 1), w, None, 2, False)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[8, 4, K\]"):
        OPS.pos_conv_fwd(x, torch.randn(8, 3, 3), None, 2, False)
    with pytest.raises(RuntimeError, match="groups must be positive and divide"):
        OPS.pos_conv_fwd(x, w, None, 3, False)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        OPS.pos_conv_fwd(x, w, torch.randn(7), 2, False)
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        OPS.pos_conv_fwd(x, w.double(), None, 2, False)
    wave = torch.randn(1, 1, 50)
    with pytest.raises(RuntimeError, match="norm_weight and norm_bias are required"):
        OPS.conv_norm_gelu_fwd(wave, torch.randn(4, 1, 10), None, None, None, 5, 1, 1e-5)
    with pytest.raises(RuntimeError, match="fewer than the kernel size"):
        OPS.conv_norm_gelu_fwd(wave[..., :5], torch.randn(4, 1, 10), None, None, None, 5, 0, 1e-5)
    with pytest.raises(RuntimeError, match="x must have 3 dims"):
        OPS.conv_norm_gelu_fwd(wave[0], torch.randn(4, 1, 10), None, None, None, 5, 0, 1e-5)
    with pytest.raises(RuntimeError, match="norm_kind must be"):
        OPS.conv_norm_gelu_fwd(wave, torch.randn(4, 1, 10), None, None, None, 5, 3, 1e-5)
    with pytest.raises(RuntimeError, match="logits must be float32 or float64"):
        OPS.gumbel_quantizer_fwd(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int64), 2,
                                 1.0, False, None, 0, 0)
    with pytest.raises(RuntimeError, match=r"codevectors must have shape \[6"):
        OPS.gumbel_quantizer_fwd(torch.randn(2, 6), torch.randn(4, 2), 2, 1.0, False, None, 0, 0)


def test_backend_reasons():
    x, g, v, bias = _pos_conv_inputs(1, 4, 8, 2, 3)
    # The backends' reasons as registered: the base check of the declared capabilities plus their own.
    reasons = dispatch._REGISTRY["pos_conv"]["cpp"].not_supported_reasons(x.half(), g.half(), v.half(), bias.half(), 2,
                                                                         "relu")
    assert any("gelu" in r for r in reasons) and any("float32/float64" in r for r in reasons)
    with dispatch.backend("cpp"), pytest.raises(dispatch.BackendNotSupportedError, match="gelu"):
        uf.ops.pos_conv(x, g, v, bias, 2, "relu")
    logits, cv = _gumbel_inputs(1, 2, 2, 5, 4)
    assert dispatch._REGISTRY["gumbel_quantizer"]["cuda"].not_supported_reasons(logits, cv, 2, 1.0, False)  # CPU tensors


# ---------------------------------------------------------------------------------------------- opcheck / compile
def _opcheck_cases():
    x, g, v, bias = _pos_conv_inputs(2, 6, 8, 2, 4)
    w = torch._weight_norm(v, g, 2).detach()
    _, preact = OPS.pos_conv_fwd(x, w, bias, 2, True)
    logits, cv = _gumbel_inputs(2, 3, 2, 5, 6)
    lg, cb = logits.view(6, 10), cv.view(10, 3)
    gum = -torch.empty(6, 10).exponential_().log()
    q, idx, soft, _ = OPS.gumbel_quantizer_fwd(lg, cb, 2, 0.5, True, gum, 0, 0)
    wave, wc = torch.randn(2, 3, 40), torch.randn(5, 3, 3)
    n1, n2 = torch.rand(5) + 0.5, torch.randn(5)
    return [
        ("pos_conv_fwd", (x.requires_grad_(), w.requires_grad_(), bias.requires_grad_(), 2, True)),
        ("pos_conv_fwd", (x.detach(), w.detach(), None, 2, False)),
        ("pos_conv_bwd", (torch.randn_like(x), x.detach(), w.detach(), preact, 2, True)),
        ("conv_norm_gelu_fwd", (wave.requires_grad_(), wc.requires_grad_(), None, n1, n2, 2, 1, 1e-5)),
        ("conv_norm_gelu_fwd", (wave.detach(), wc.detach(), torch.randn(5), n1, n2, 1, 2, 1e-5)),
        ("gumbel_quantizer_fwd", (lg.clone().requires_grad_(), cb.clone().requires_grad_(), 2, 0.5, True, gum, 0, 0)),
        ("gumbel_quantizer_fwd", (lg, cb.clone().requires_grad_(), 2, 0.5, False, None, 0, 0)),
        ("gumbel_quantizer_bwd", (torch.randn_like(q), torch.tensor(1.5), lg, cb, idx, soft, 2, 0.5, True)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    assert ext.ensure_registered()
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_torch_compile_fullgraph_through_cpp_implementations():
    """The cpp backend's functions (fakes, autograd, the ops) trace with fullgraph=True. (Compiling through
    ``dispatch.call`` itself breaks the graph at ``ContextVar.get``: that is the dispatcher's, not the ops'.)"""
    x, g, v, bias = _pos_conv_inputs(1, 9, 16, 2, 4)
    logits, cv = _gumbel_inputs(1, 9, 2, 5, 4)
    wave = torch.randn(1, 120)
    fe = _stack_params("group", (8, 8), (10, 3))

    def f(x, g, v, bias, logits, cv, wave):
        h = pc_ext.pos_conv_ext(x, g, v, bias, 2)
        q, perp = gq_ext.gumbel_quantizer_ext(logits, cv, 2, 1.0, False)
        feats = fe_ext.feature_extractor_ext(wave, *fe, [5, 2], "group")
        return (h * h).sum() + q.sum() + perp + feats.sum(), h, q, perp, feats

    assert ext.ensure_registered()
    args = [x.requires_grad_(), g.requires_grad_(), v.requires_grad_(), bias, logits, cv.requires_grad_(), wave]
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    got[0].backward()
    got_grads = [t.grad.clone() for t in (x, g, v, cv)]
    for t in (x, g, v, cv):
        t.grad = None
    h = pos_conv_ref(x, g, v, bias, 2)
    q, perp = gumbel_quantizer_ref(logits, cv, 2, 1.0, False)
    feats = feature_extractor_ref(wave, *fe, [5, 2], "group")
    want = ((h * h).sum() + q.sum() + perp + feats.sum(), h, q, perp, feats)
    want[0].backward()
    for o, r in zip(got, want):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    for o, r in zip(got_grads, (x.grad, g.grad, v.grad, cv.grad)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- models
NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                     layerdrop=0.0, mask_time_prob=0.0, final_dropout=0.0)


@pytest.fixture
def cpp_calls(monkeypatch):
    """Counts the calls that reach the cpp implementation of each op; auto uses its default order (cpp
    before eager) rather than the measured one, which may rank eager first on this CPU."""
    ext.ensure_registered()
    monkeypatch.setattr(dispatch.selection, "_MEASURED_ORDERS", {})
    counts = {op: 0 for op in ("feature_extractor", "pos_conv", "gumbel_quantizer")}
    for op in counts:
        impl = dispatch._REGISTRY[op]["cpp"]

        def counting(*args, _fn=impl.fn, _op=op, **kwargs):
            counts[_op] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(dispatch._REGISTRY[op], "cpp", dataclasses.replace(impl, fn=counting))
    return counts


# UniSpeechSatForPreTraining has no quantizer in its forward (as in transformers).
@pytest.mark.parametrize("family,norm,ops", [
    ("UniSpeech", "group", ("feature_extractor", "pos_conv", "gumbel_quantizer")),
    ("UniSpeechSat", "layer", ("feature_extractor", "pos_conv")),
])
def test_model_eval_auto_uses_cpp_and_matches_eager(cpp_calls, family, norm, ops):
    config = getattr(uf, family + "Config")(**tiny_config_kwargs(
        family, **NO_RANDOMNESS, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer"))
    model = uf.__dict__[family + "ForPreTraining"](config).eval()
    x, mask = padded_batch([1400, 1100])
    with torch.no_grad():
        with uf.backend("eager"):
            ref = model(x, attention_mask=mask)
        with uf.backend("auto"):
            out = model(x, attention_mask=mask)
    assert all(cpp_calls[op] > 0 for op in ops), cpp_calls
    for key in ("projected_states", "projected_quantized_states", "codevector_perplexity"):
        if getattr(ref, key) is not None:
            torch.testing.assert_close(getattr(out, key), getattr(ref, key), atol=2e-4, rtol=2e-4, msg=key)


def test_unispeech_training_step_auto_matches_eager(cpp_calls):
    """Training mode samples Gumbel noise: the cpp backend draws it from torch's RNG as eager does."""
    config = uf.UniSpeechConfig(**tiny_config_kwargs("UniSpeech", **NO_RANDOMNESS))
    model = uf.UniSpeechForPreTraining(config).train()
    x, mask = padded_batch([1400, 1100])

    def step(name):
        model.zero_grad()
        torch.manual_seed(7)
        with uf.backend(name):
            out = model(x, attention_mask=mask)
            loss = out.projected_states.square().mean() + out.projected_quantized_states.mean() + out.codevector_perplexity
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = step("eager")
    loss, grads = step("auto")
    assert all(n > 0 for n in cpp_calls.values()), cpp_calls
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
