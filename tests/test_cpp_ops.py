"""The C++ CPU extension ``unispeech_fast._C`` (the ``cpp`` backend) across ops: the extension is built and its
kernels registered, the three ops trace together under ``torch.compile``, and whole models under ``auto`` reach the
cpp implementations and match eager. Each op's own C++ tests (against its reference, bad inputs, opcheck) are in
``tests/ops/test_<op>.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import unispeech_fast as uf
from unispeech_fast import _extension, dispatch
from unispeech_fast.ops import _extension_ops as ext
from unispeech_fast.ops.feature_extractor import extension as fe_ext
from unispeech_fast.ops.gumbel_quantizer import extension as gq_ext
from unispeech_fast.ops.pos_conv import extension as pc_ext
from unispeech_fast.ops.feature_extractor import feature_extractor_ref
from unispeech_fast.ops.gumbel_quantizer import gumbel_quantizer_ref
from unispeech_fast.ops.pos_conv import pos_conv_ref
from conftest import padded_batch, tiny_config_kwargs


def test_extension_is_built_and_registered():
    status = _extension.status()
    assert status.loaded, status.reason
    assert ext.ensure_registered()
    for name in ("pos_conv_fwd", "pos_conv_bwd", "conv_norm_gelu_fwd", "gumbel_quantizer_fwd", "gumbel_quantizer_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"unispeech_fast::{name}", "CPU"), name


# ---------------------------------------------------------------------------------------------- compile
def _compile_inputs():
    """pos_conv (x, g, v, bias; 9 frames, hidden 16, 2 groups, K 4), Gumbel (logits, codevectors; G 2, V 5, D 4), a
    waveform of 120 samples and a two-layer feature extractor stack (8 channels, kernels 10 and 3)."""
    x = torch.randn(1, 9, 16)
    v = torch.randn(16, 8, 4) * 32 ** -0.5
    g = torch.rand(1, 1, 4) + 0.5
    bias = torch.randn(16) * 0.1
    logits = torch.randn(1, 9, 10) * 2
    cv = torch.randn(1, 10, 2)
    wave = torch.randn(1, 120)
    fe = ([torch.randn(8, 1, 10) * 10 ** -0.5, torch.randn(8, 8, 3) * 24 ** -0.5],
          [torch.randn(8) * 0.1, torch.randn(8) * 0.1], [1 + 0.1 * torch.randn(8), None], [0.1 * torch.randn(8), None])
    return x, g, v, bias, logits, cv, wave, fe


def test_torch_compile_fullgraph_through_cpp_implementations():
    """The cpp backend's functions (fakes, autograd, the ops) trace with fullgraph=True. (Compiling through
    ``dispatch.call`` itself breaks the graph at ``ContextVar.get``: that is the dispatcher's, not the ops'.)"""
    x, g, v, bias, logits, cv, wave, fe = _compile_inputs()

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
