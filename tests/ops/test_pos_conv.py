"""The positional conv (``unispeech_fast.ops.pos_conv``): its eager reference, and the backends that declare
support for a case (``tests/_backends.py``: triton, cpp) against it; then each backend's own parts (the Triton
weight folding and custom ops, the C++ and CUDA ops of ``unispeech_fast._C``).

On CPU the Triton kernels run under the Triton interpreter (conftest sets ``TRITON_INTERPRET``) at small
shapes; ``gpu`` tests run the real sizes (hidden 768/1024, kernel 128, 16 groups). Tolerance: the
kernel's max error against the fp64 reference is at most 2x the error of eager PyTorch in the same
dtype, plus a tiny floor, for the output and every gradient.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import unispeech_fast as uf
from unispeech_fast import dispatch
from unispeech_fast.ops import _extension_ops as ext
from unispeech_fast.ops.pos_conv import pos_conv, pos_conv_ref
from _backends import DEVICE, declaring, device_for, run_on
from _tolerance import assert_close_cuda as _assert_close, assert_within_2x_eager

# the triton backend module (its launchers and dispatch entry)
pos_conv_mod = importlib.import_module("unispeech_fast.ops.pos_conv.triton")

_NAMES = ("x", "weight_g", "weight_v", "bias")


def _inputs(batch, frames, hidden, groups, kernel, bias=True, seed=0, device="cpu"):
    """fp64 inputs: x, g ([1, 1, K], positive), v and bias (or None)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, hidden, generator=gen, dtype=torch.float64)
    g = torch.rand(1, 1, kernel, generator=gen, dtype=torch.float64) + 0.5
    v = torch.randn(hidden, hidden // groups, kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(hidden, generator=gen, dtype=torch.float64) if bias else None
    return [t.to(device) if t is not None else None for t in (x, g, v, b)]


def _run(fn, tensors, groups, grad_out, dtype):
    """``fn`` on ``tensors`` cast to ``dtype`` (leaves requiring grad); returns output and grads in fp64."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves, groups)
    out.backward(grad_out.to(dtype))
    grads = [leaf.grad.double() if leaf is not None else None for leaf in leaves]
    return [out.detach().double()] + grads


def _assert_within_2x_eager(tensors, groups, dtype, seed=1, backend="triton"):
    """``backend``'s kernel and eager (both in ``dtype``) against the fp64 reference, output and every gradient."""
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad_out = grad_out.to(tensors[0].device)
    ref = _run(pos_conv_ref, tensors, groups, grad_out, torch.float64)
    eager = _run(pos_conv_ref, tensors, groups, grad_out, dtype)
    kern = _run(run_on(backend, pos_conv), tensors, groups, grad_out, dtype)
    for name, r, e, k in zip(("out",) + _NAMES, ref, eager, kern):
        if r is None:
            assert k is None and e is None
            continue
        # The shared rule with the floor these tests have always had (the results come back in fp64): 2 units
        # roundoff of ``dtype`` times (max |ref| + 1).
        assert_within_2x_eager(f"{name} ({dtype})", k, e, r, 2 * torch.finfo(dtype).eps, scale="ref+1")


# (batch, frames, hidden, groups, kernel): odd and even K, frames 1 / primes / below and above the
# 16-frame interpreter tile, 8 channels per group (padded to a 16-wide block), 24 channels per
# group (two channel blocks), and the real K = 128 with 16 groups at a tiny hidden size; then one frame with
# K = 4, three groups of 4 channels with K = 5, and one group of 24 channels with K = 3.
SHAPES = [
    (2, 1, 32, 4, 8),
    (2, 5, 32, 4, 9),
    (1, 17, 32, 4, 16),
    (1, 67, 32, 4, 9),
    (1, 17, 48, 2, 16),
    (1, 5, 32, 16, 128),
    (1, 1, 16, 2, 4),
    (2, 7, 12, 3, 5),
    (2, 37, 24, 1, 3),
]
_ID = "B{}_T{}_H{}_G{}_K{}".format


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("kernel,groups,hidden,frames",
                         [(128, 16, 32, 1), (128, 16, 48, 131), (16, 2, 16, 17), (7, 1, 4, 5)])
def test_reference_matches_weight_norm_module(kernel, groups, hidden, frames):
    conv = torch.nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=groups).double()
    conv = torch.nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
    with torch.no_grad():
        conv.parametrizations.weight.original0.normal_()
    x = torch.randn(3, frames, hidden, dtype=torch.float64)
    y = conv(x.transpose(1, 2))
    if kernel % 2 == 0:
        y = y[:, :, :-1]
    expected = x + F.gelu(y).transpose(1, 2)
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    got = pos_conv_ref(x, g, v, conv.bias, groups)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # weight norm: norm over (out, in) per tap
    w = g * v / v.norm(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(conv.weight, w, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: _ID(*s))
@pytest.mark.parametrize("backend", declaring("pos_conv", torch.float32))
def test_fp32_matches_reference(backend, shape):
    batch, frames, hidden, groups, kernel = shape
    _assert_within_2x_eager(_inputs(*shape, device=device_for("pos_conv", backend)), groups, torch.float32,
                            backend=backend)


@pytest.mark.parametrize("backend", declaring("pos_conv", torch.float32, cpu_kernels_only=True))
def test_fp32_real_hidden_size(backend):
    """Hidden 768, 16 groups, K = 128 (UniSpeech base) at 61 frames, on the compiled CPU kernels (Triton's
    interpreter takes about ten minutes here; ``test_real_sizes_on_gpu`` runs Triton at real sizes)."""
    _assert_within_2x_eager(_inputs(1, 61, 768, 16, 128, device=device_for("pos_conv", backend)), 16,
                            torch.float32, backend=backend)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[4]], ids=lambda s: _ID(*s))
@pytest.mark.parametrize("backend", declaring("pos_conv", torch.float16))
def test_fp16_matches_reference(backend, shape):
    batch, frames, hidden, groups, kernel = shape
    _assert_within_2x_eager(_inputs(*shape, device=device_for("pos_conv", backend)), groups, torch.float16,
                            backend=backend)


@pytest.mark.parametrize("shape", SHAPES[6:] + SHAPES[2:3], ids=lambda s: _ID(*s))
@pytest.mark.parametrize("backend", declaring("pos_conv", torch.float64))
def test_fp64_matches_reference_to_fp64_precision(backend, shape):
    """In fp64, with and without bias, output and gradients equal the fp64 reference to fp64 precision."""
    batch, frames, hidden, groups, kernel = shape
    for bias in (True, False):
        tensors = _inputs(*shape, bias=bias, device=device_for("pos_conv", backend))
        grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref = _run(pos_conv_ref, tensors, groups, grad_out, torch.float64)
        ours = _run(run_on(backend, pos_conv), tensors, groups, grad_out, torch.float64)
        for name, r, o in zip(("out",) + _NAMES, ref, ours):
            if r is None:
                assert o is None, name
                continue
            rtol = 1e-10 if name == "out" else 1e-9
            torch.testing.assert_close(o, r, rtol=rtol, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", declaring("pos_conv", torch.float32))
def test_without_bias(backend):
    _assert_within_2x_eager(_inputs(2, 17, 32, 4, 9, bias=False, device=device_for("pos_conv", backend)), 4,
                            torch.float32, backend=backend)


# ---------------------------------------------------------------------------------------------- triton


def test_frozen_weights_give_only_the_input_gradient():
    x, g, v, b = _inputs(2, 17, 32, 4, 9, device=DEVICE)
    x_ref = x.clone().requires_grad_()
    pos_conv_ref(x_ref, g, v, b, 4).sum().backward()
    xk = x.float().requires_grad_()
    with dispatch.backend("triton"):
        pos_conv(xk, g.float(), v.float(), b.float(), 4).sum().backward()
    torch.testing.assert_close(xk.grad.double(), x_ref.grad, atol=1e-5, rtol=1e-5)


def test_zero_frames():
    x, g, v, b = [t.float() for t in _inputs(2, 0, 32, 4, 8, device=DEVICE)]
    x.requires_grad_()
    with dispatch.backend("triton"):
        out = pos_conv(x, g, v, b, 4)
    assert out.shape == (2, 0, 32)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_unsupported_inputs_are_refused_with_reasons():
    x, g, v, b = [t.float() for t in _inputs(1, 5, 32, 4, 8)]
    with dispatch.backend("triton"), pytest.raises(dispatch.BackendNotSupportedError, match="activation 'gelu'"):
        pos_conv(x, g, v, b, 4, activation="relu")
    with dispatch.backend("triton"), pytest.raises(dispatch.BackendNotSupportedError, match="weight_v dtype"):
        pos_conv(x, g, v.double(), b, 4)
    with dispatch.backend("triton"), pytest.raises(dispatch.BackendNotSupportedError, match="positive divisor"):
        pos_conv(x, g, torch.randn(32, 5, 8), b, 5)
    reasons = pos_conv_mod._triton_not_supported(x.bfloat16(), g.bfloat16(), v.bfloat16(), b.bfloat16(), 4)
    assert any("interpreter" in r for r in reasons)


# ---------------------------------------------------------------------------------------------- weight folding
def _count_folds(monkeypatch):
    calls = []
    real = pos_conv_mod._fold_weight

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pos_conv_mod, "_fold_weight", counting)
    return calls


def test_folded_weight_is_recomputed_on_every_call_and_sees_every_weight_update(monkeypatch):
    """No folded-weight cache: in-place updates and ``.data`` writes (no version bump) are both seen."""
    calls = _count_folds(monkeypatch)
    x, g, v, b = [t.float() for t in _inputs(1, 17, 32, 4, 9, device=DEVICE)]
    g, v = torch.nn.Parameter(g), torch.nn.Parameter(v)
    with torch.no_grad(), dispatch.backend("triton"):
        first = pos_conv(x, g, v, b, 4)
        second = pos_conv(x, g, v, b, 4)
        assert len(calls) == 2, "the folded weight must be recomputed on every call"
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        v.add_(1.0)
        third = pos_conv(x, g, v, b, 4)
    g.data.mul_(2.0)  # bypasses the version counter: a key on (data_ptr, _version) would miss it
    with torch.no_grad(), dispatch.backend("triton"):
        fourth = pos_conv(x, g, v, b, 4)
    ref3 = pos_conv_ref(x.double(), g.detach().double() / 2, v.detach().double(), b.double(), 4)
    ref4 = pos_conv_ref(x.double(), g.detach().double(), v.detach().double(), b.double(), 4)
    torch.testing.assert_close(third.double(), ref3, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fourth.double(), ref4, atol=1e-5, rtol=1e-5)


def test_folded_weight_is_recomputed_under_autograd(monkeypatch):
    calls = _count_folds(monkeypatch)
    x, g, v, b = [t.float() for t in _inputs(1, 5, 32, 4, 8, device=DEVICE)]
    g, v = torch.nn.Parameter(g), torch.nn.Parameter(v)
    with dispatch.backend("triton"):
        pos_conv(x, g, v, b, 4).sum().backward()
        pos_conv(x, g, v, b, 4)
    assert len(calls) == 2
    assert g.grad is not None and v.grad is not None


# ---------------------------------------------------------------------------------------------- torch.library
def test_opcheck_custom_ops():
    x, g, v, b = [t.float() for t in _inputs(2, 3, 16, 2, 5, device=DEVICE)]
    packed = pos_conv_mod._fold_weight(g, v, 2).contiguous()
    fwd = torch.ops.unispeech_fast.triton_pos_conv_fwd
    torch.library.opcheck(fwd, (x.requires_grad_(), packed.requires_grad_(), b.requires_grad_(), True))
    torch.library.opcheck(fwd, (x.detach(), packed.detach(), None, False))
    out, pre = fwd(x.detach(), packed.detach(), b.detach(), True)
    bwd = torch.ops.unispeech_fast.triton_pos_conv_bwd
    torch.library.opcheck(bwd, (torch.randn_like(out), x.detach(), packed.detach(), pre, True, True))
    torch.library.opcheck(bwd, (torch.randn_like(out), x.detach(), packed.detach(), pre, False, False))


def test_torch_compile_fullgraph_equals_eager():
    """The triton backend's function (weight folding + the custom ops, forward and backward) compiles
    as one graph. It is called directly: backend selection reads a ContextVar, which dynamo cannot trace."""
    torch._dynamo.reset()
    x, g, v, b = [t.float() for t in _inputs(1, 9, 32, 4, 8, device=DEVICE)]

    def f(x, g, v, b):
        return pos_conv_mod._pos_conv_triton(x, g, v, b, 4)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, g, v, b)]
    leaves_c = [t.clone().requires_grad_() for t in (x, g, v, b)]
    out = f(*leaves)
    out_c = compiled(*leaves_c)
    torch.testing.assert_close(out_c, out, atol=0, rtol=0)
    out.sum().backward()
    out_c.sum().backward()
    for a, c in zip(leaves, leaves_c):
        torch.testing.assert_close(c.grad, a.grad, atol=0, rtol=0)


def test_positional_conv_module_triton_matches_eager():
    from unispeech_fast.configuration import UniSpeechConfig
    from unispeech_fast.modules import PositionalConvEmbedding

    config = UniSpeechConfig(hidden_size=32, num_attention_heads=2, num_conv_pos_embeddings=16,
                             num_conv_pos_embedding_groups=4)
    module = PositionalConvEmbedding(config).to(DEVICE)
    x = torch.randn(2, 11, 32, device=DEVICE)
    out_e = module(x)
    out_e.square().sum().backward()
    grads_e = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    with dispatch.backend("triton"):
        out_t = module(x)
        out_t.square().sum().backward()
    torch.testing.assert_close(out_t, out_e, atol=1e-5, rtol=1e-5)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, grads_e[name], atol=1e-4, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------- C++ op (cpp)
OPS = torch.ops.unispeech_fast if ext.ensure_registered() else None  # fakes + autograd registered


def _op_inputs(b, t, h, groups, k, dtype=torch.float32):
    """fp32 x, g, v (scaled to unit fan-in) and bias for the raw ops."""
    x = torch.randn(b, t, h)
    v = torch.randn(h, h // groups, k) * (h // groups * k) ** -0.5
    g = torch.rand(1, 1, k) + 0.5
    bias = torch.randn(h) * 0.1
    return [t_.to(dtype) for t_ in (x, g, v, bias)]


def test_cpp_op_without_grad_saves_no_preact_and_refuses_backward():
    x, g, v, bias = _op_inputs(1, 5, 8, 2, 3)
    weight = torch._weight_norm(v, g, 2)
    out, preact = OPS.pos_conv_fwd(x, weight, bias, 2, False)
    assert preact.numel() == 0
    torch.testing.assert_close(out, pos_conv_ref(x, g, v, bias, 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="preact is empty"):
        OPS.pos_conv_bwd(torch.ones_like(x), x, weight, preact, 2, True)


def test_cpp_op_bad_inputs_name_the_argument():
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


def test_cpp_reasons():
    x, g, v, bias = _op_inputs(1, 4, 8, 2, 3)
    # The backend's reasons as registered: the base check of the declared capabilities plus its own.
    reasons = dispatch._REGISTRY["pos_conv"]["cpp"].not_supported_reasons(x.half(), g.half(), v.half(), bias.half(), 2,
                                                                         "relu")
    assert any("gelu" in r for r in reasons) and any("float32/float64" in r for r in reasons)
    with dispatch.backend("cpp"), pytest.raises(dispatch.BackendNotSupportedError, match="gelu"):
        uf.ops.pos_conv(x, g, v, bias, 2, "relu")


def _cpp_opcheck_cases():
    x, g, v, bias = _op_inputs(2, 6, 8, 2, 4)
    w = torch._weight_norm(v, g, 2).detach()
    _, preact = OPS.pos_conv_fwd(x, w, bias, 2, True)
    return [
        ("pos_conv_fwd", (x.requires_grad_(), w.requires_grad_(), bias.requires_grad_(), 2, True)),
        ("pos_conv_fwd", (x.detach(), w.detach(), None, 2, False)),
        ("pos_conv_bwd", (torch.randn_like(x), x.detach(), w.detach(), preact, 2, True)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_cpp_opcheck(case):
    assert ext.ensure_registered()
    name, args = _cpp_opcheck_cases()[case]
    torch.library.opcheck(getattr(OPS, name).default, args)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden,frames", [(768, 499), (1024, 1500)])
def test_real_sizes_on_gpu(hidden, frames, dtype):
    _assert_within_2x_eager(_inputs(2, frames, hidden, 16, 128, device="cuda"), 16, dtype)


# ---------------------------------------------------------------------------------------------- GPU: CUDA op (cuda)


def _pos_conv_folded(x, weight, bias, groups):
    """Test oracle of the raw op (weight norm already folded): x + gelu(conv1d(x^T)[..., :T])^T."""
    k = weight.shape[-1]
    h = F.conv1d(x.transpose(1, 2), weight, bias, padding=k // 2, groups=groups)[:, :, : x.shape[1]]
    return x + F.gelu(h).transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "hidden,groups,kernel,seq",
    [(96, 2, 16, 1), (96, 2, 16, 37), (128, 2, 128, 130), (128, 2, 128, 37), (20, 4, 7, 37), (20, 4, 7, 1),
     (768, 16, 128, 130)],
)
def test_cuda_op_fwd_bwd(cuda_ops, dtype, hidden, groups, kernel, seq):
    ops = cuda_ops
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
