"""The Triton positional conv (``unispeech_fast.ops.pos_conv``, backend ``triton``).

On CPU the kernels run under the Triton interpreter (conftest sets ``TRITON_INTERPRET``) at small
shapes; ``gpu`` tests run the real sizes (hidden 768/1024, kernel 128, 16 groups). Tolerance: the
kernel's max error against the fp64 reference is at most 2x the error of eager PyTorch in the same
dtype, plus a tiny floor, for the output and every gradient.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from unispeech_fast import dispatch
from unispeech_fast.ops.pos_conv import pos_conv, pos_conv_ref
from _tolerance import assert_within_2x_eager

# the triton backend module (its launchers and dispatch entry)
pos_conv_mod = importlib.import_module("unispeech_fast.ops.pos_conv.triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
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


def _triton(*args):
    with dispatch.backend("triton"):
        return pos_conv(*args)


def _assert_within_2x_eager(tensors, groups, dtype, seed=1):
    """Kernel and eager (both in ``dtype``) against the fp64 reference, output and every gradient."""
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad_out = grad_out.to(tensors[0].device)
    ref = _run(pos_conv_ref, tensors, groups, grad_out, torch.float64)
    eager = _run(pos_conv_ref, tensors, groups, grad_out, dtype)
    kern = _run(_triton, tensors, groups, grad_out, dtype)
    for name, r, e, k in zip(("out",) + _NAMES, ref, eager, kern):
        if r is None:
            assert k is None and e is None
            continue
        # The shared rule with the floor these tests have always had (the results come back in fp64): 2 units
        # roundoff of ``dtype`` times (max |ref| + 1).
        assert_within_2x_eager(f"{name} ({dtype})", k, e, r, 2 * torch.finfo(dtype).eps, scale="ref+1")


# (batch, frames, hidden, groups, kernel): odd and even K, frames 1 / primes / below and above the
# 16-frame interpreter tile, 8 channels per group (padded to a 16-wide block), 24 channels per
# group (two channel blocks), and the real K = 128 with 16 groups at a tiny hidden size.
SHAPES = [
    (2, 1, 32, 4, 8),
    (2, 5, 32, 4, 9),
    (1, 17, 32, 4, 16),
    (1, 67, 32, 4, 9),
    (1, 17, 48, 2, 16),
    (1, 5, 32, 16, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_H{}_G{}_K{}".format(*s))
def test_fp32_matches_reference(shape):
    batch, frames, hidden, groups, kernel = shape
    _assert_within_2x_eager(_inputs(*shape, device=DEVICE), groups, torch.float32)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[4]], ids=lambda s: "B{}_T{}_H{}_G{}_K{}".format(*s))
def test_fp16_matches_reference(shape):
    batch, frames, hidden, groups, kernel = shape
    _assert_within_2x_eager(_inputs(*shape, device=DEVICE), groups, torch.float16)


def test_without_bias():
    _assert_within_2x_eager(_inputs(2, 17, 32, 4, 9, bias=False, device=DEVICE), 4, torch.float32)


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


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden,frames", [(768, 499), (1024, 1500)])
def test_real_sizes_on_gpu(hidden, frames, dtype):
    _assert_within_2x_eager(_inputs(2, frames, hidden, 16, 128, device="cuda"), 16, dtype)
