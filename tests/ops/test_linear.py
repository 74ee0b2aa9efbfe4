"""The dispatched dense layer: the cpp (oneDNN) backend against an fp64 reference, within the tolerance
policy (about 2x the eager op's error), its limits, and the models' use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unispeech_fast as uf
from unispeech_fast import dispatch
from unispeech_fast.ops import linear, linear_ref
from unispeech_fast.ops.linear.extension import _cpp_reasons, linear_cpp
from conftest import tiny_config_kwargs

needs_onednn = pytest.mark.skipif(bool(_cpp_reasons(torch.ones(1, 1), torch.ones(1, 1))),
                                  reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("shape,n", [
    ((1, 5, 7), 3),            # tiny, odd
    ((2, 33, 768), 3072),      # base FFN up-projection (K = 768: one chunk)
    ((1, 499, 3072), 768),     # base FFN down-projection (K = 3072: four chunks)
    ((3, 17, 1000), 129),      # K not a multiple of the chunk
    ((499, 768), 2304),        # 2-D input, fused q/k/v width
])
def test_cpp_linear_error_is_within_the_policy(shape, n):
    g = torch.Generator().manual_seed(sum(shape) + n)
    k = shape[-1]
    worst_abs = worst_norm = 0.0
    for _ in range(3):
        x = torch.randn(*shape, generator=g)
        w = torch.randn(n, k, generator=g) / k ** 0.5
        b = torch.randn(n, generator=g)
        ref = F.linear(x.double(), w.double(), b.double())
        eager = linear_ref(x, w, b).double()
        ours = linear_cpp(x, w, b)
        assert ours.shape == ref.shape and ours.dtype == torch.float32
        ours = ours.double()
        worst_abs = max(worst_abs, ((ours - ref).abs().max() / (eager - ref).abs().max().clamp_min(1e-12)).item())
        worst_norm = max(worst_norm, ((ours - ref).norm() / (eager - ref).norm().clamp_min(1e-12)).item())
    # Tolerance policy: about 2x the eager op's error against fp64 (normwise 2x; max abs 2.5x, since a
    # single worst element of one draw is noisier than the norm).
    assert worst_norm <= 2.0 and worst_abs <= 2.5, (worst_norm, worst_abs)


@needs_onednn
def test_cpp_linear_without_bias_and_with_strided_input():
    x = torch.randn(6, 40, 20).transpose(0, 1)  # non-contiguous [40, 6, 20]
    w = torch.randn(9, 20)
    torch.testing.assert_close(linear_cpp(x, w, None), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_auto_keeps_autograd_calls_on_eager():
    x = torch.randn(2, 3, 8)
    w = torch.randn(4, 8, requires_grad=True)
    assert "no backward" in " ".join(_cpp_reasons(x, w, None))
    assert dispatch.select("linear", {"x": x, "weight": w, "bias": None}).backend == "eager"
    linear(x, w).sum().backward()
    assert w.grad is not None
    assert "float32" in " ".join(_cpp_reasons(x.double(), w.detach().double(), None))
    with uf.backend("cpp"), pytest.raises(uf.BackendNotSupportedError, match="no backward"):
        linear(x, w)


def test_models_call_wrapped_or_hooked_projections_as_modules():
    """A hooked (or PEFT-wrapped) Linear is never bypassed through its weight."""
    config = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat"))
    model = uf.UniSpeechSatModel(config).eval()
    layer = model.encoder.layers[0]
    seen = []
    for name in ("q_proj", "out_proj"):
        getattr(layer.attention, name).register_forward_hook(lambda m, i, o, name=name: seen.append(name))
    layer.feed_forward.output_dense.register_forward_hook(lambda m, i, o: seen.append("output_dense"))
    x = torch.randn(1, 4000)
    with torch.no_grad():
        hooked = model(x).last_hidden_state
        for name in ("q_proj", "out_proj"):
            getattr(layer.attention, name)._forward_hooks.clear()
        layer.feed_forward.output_dense._forward_hooks.clear()
        plain = model(x).last_hidden_state
    assert seen == ["q_proj", "out_proj", "output_dense"]
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_cpp_linear_is_a_registered_op_that_torch_compile_keeps():
    """The cpp backend is the custom op ``unispeech_fast::onednn_linear`` (fake shapes checked by opcheck),
    so a compiled model keeps it; see tests/test_reliability.py for the whole model."""
    from unispeech_fast.ops.linear.extension import _onednn_linear

    for x, w, b in [(torch.randn(2, 5, 7), torch.randn(3, 7), torch.randn(3)),
                    (torch.randn(9, 1000), torch.randn(4, 1000), None)]:
        torch.library.opcheck(_onednn_linear, (x, w, b))
        with torch.no_grad():
            compiled = torch.compile(linear_cpp, backend="aot_eager", fullgraph=True)(x, w, b)
        torch.testing.assert_close(compiled, linear_cpp(x, w, b), atol=0, rtol=0)
