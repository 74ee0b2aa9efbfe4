"""The C++ CPU flash attention (``cpp`` backend of ``attention``, ``csrc/cpu/attention.cpp``) against the
eager reference: awkward lengths (1, 7, 129, 1000 frames: one, partial and several key blocks), key
padding (a fully padded row included), head masks, fp32 / bf16 / fp16 / fp64, gradients (the backward
recomputes the reference), custom-op checks, torch.compile, and whole models under ``backend("cpp")``.

Tolerance: the 2x-of-eager-error rule against the fp64 reference (``check_against_reference`` of
tests/test_attention.py, shared with the Triton tests).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import unispeech_fast as uf
from unispeech_fast import dispatch
from unispeech_fast.ops import attention, attention_ref
from unispeech_fast.ops.attention import extension as _attention_cpp  # the cpp (and cuda) backends
from unispeech_fast.ops import _extension_ops as ext
from conftest import padded_batch, tiny_config_kwargs
from test_attention import _run, check_against_reference, make_qkv, right_padded_mask

OPS = torch.ops.unispeech_fast if ext.ensure_registered() else None


def test_kernel_is_registered_for_cpu():
    assert ext.ensure_registered()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("unispeech_fast::attention_fwd", "CPU")
    assert "cpp" in dispatch.implemented_backends()["attention"]


# --------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frames", [1, 7, 129, 1000])
def test_matches_reference(dtype, frames):
    q, k, v = make_qkv(2, frames, 2, 64, dtype)
    check_against_reference(q, k, v, backend="cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frames", [7, 129, 1000])
def test_padding_and_head_mask(dtype, frames):
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


@pytest.mark.parametrize("head_dim", [1, 16, 80])
def test_other_head_dims(head_dim):
    q, k, v = make_qkv(2, 300, 3, head_dim, torch.float32)
    check_against_reference(q, k, v, backend="cpp", key_padding_mask=right_padded_mask([300, 257], 300))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_fully_padded_row_attends_uniformly(dtype, tol):
    """A batch row with no valid key: the reference's masked_fill(finfo.min) makes every score equal, so the
    row attends to all keys uniformly; the kernel matches that (output and gradients). (The eager backend's
    SDPA returns zeros there instead, so this is checked against the reference directly.)"""
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


def test_fp64_matches_reference_to_fp64_precision():
    q, k, v = make_qkv(2, 129, 2, 64, torch.float64)
    mask = right_padded_mask([129, 70], 129)
    dout = torch.randn(q.shape, dtype=torch.float64)
    ref = _run(attention_ref, q, k, v, dout, key_padding_mask=mask)
    with dispatch.backend("cpp"):
        got = _run(attention, q, k, v, dout, key_padding_mask=mask)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


def test_head_mask_gradient():
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


def test_layouts_are_read_in_place_or_copied():
    """Strided views of one fused projection, a contiguous copy, and a last dim with stride != 1 agree."""
    q, k, v = make_qkv(2, 50, 3, 16, torch.float32)
    with dispatch.backend("cpp"):
        views, _ = attention(q, k, v)
        dense, _ = attention(q.contiguous(), k.contiguous(), v.contiguous())
        flipped = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
        strided, _ = attention(*flipped)
    assert torch.equal(views, dense) and torch.equal(views, strided)
    torch.testing.assert_close(views, attention_ref(q, k, v)[0], atol=2e-6, rtol=1e-5)


def test_padded_batch_equals_per_sample():
    q, k, v = make_qkv(1, 300, 2, 32, torch.float32)
    mask = right_padded_mask([259], 300)
    with dispatch.backend("cpp"):
        padded, _ = attention(q, k, v, key_padding_mask=mask)
        alone, _ = attention(q[:, :259], k[:, :259], v[:, :259])
    torch.testing.assert_close(padded[:, :259], alone, atol=1e-6, rtol=1e-5)


def test_empty_inputs():
    q, k, v = make_qkv(2, 0, 2, 8, torch.float32)
    with dispatch.backend("cpp"):
        out, _ = attention(q, k, v)
    assert out.shape == (2, 0, 2, 8)


# --------------------------------------------------------------------------------------------- refusals
def test_reasons():
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


def test_auto_takes_cpp_for_inference_only(monkeypatch):
    """Auto skips the C++ attention where gradients are needed (its backward recomputes, so it always
    costs more than eager); a forced backend("cpp") still trains through it."""
    monkeypatch.setattr(dispatch.selection, "_MEASURED_ORDERS", {})  # the default order: cpp before eager
    q, k, v = make_qkv(2, 9, 2, 8, torch.float32)
    grad_inputs = {"q": q.clone().requires_grad_(), "k": k, "v": v}
    assert dispatch.select("attention", {"q": q, "k": k, "v": v}).backend == "cpp"
    assert dispatch.select("attention", grad_inputs).backend == "eager"
    assert any("always costs more than eager" in r for r in _attention_cpp._cpp_reasons(**grad_inputs))
    with torch.no_grad():
        assert dispatch.select("attention", grad_inputs).backend == "cpp"
    with dispatch.backend("cpp"):
        assert dispatch.select("attention", grad_inputs).backend == "cpp"


def test_need_weights_is_served_by_the_reference(caplog, monkeypatch):
    monkeypatch.setattr(dispatch.registry, "_logged_once", set())
    q, k, v = make_qkv(2, 9, 2, 8, torch.float32)
    mask = right_padded_mask([9, 4], 9)
    with dispatch.backend("cpp"), caplog.at_level(logging.WARNING, logger="unispeech_fast"):
        out, w = attention(q, k, v, key_padding_mask=mask, need_weights=True)
    ref_out, ref_w = attention_ref(q, k, v, key_padding_mask=mask, need_weights=True)
    assert torch.equal(out, ref_out) and torch.equal(w, ref_w)
    assert "need_weights=True run the eager reference" in caplog.text


def test_kernel_errors_name_the_argument():
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
def _opcheck_cases():
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
def test_opcheck(case):
    torch.library.opcheck(OPS.attention_fwd.default, _opcheck_cases()[case])


def test_torch_compile_fullgraph():
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
def test_whole_model_under_cpp_equals_eager(family, head, norm, monkeypatch):
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
