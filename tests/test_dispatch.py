"""Backend dispatch: selection, forced backends, reasons, the env var, and verify mode."""

from __future__ import annotations

import pytest
import torch

import unispeech_fast as uf
from unispeech_fast import dispatch
from unispeech_fast.ops import attention, attention_ref


def _qkv(b=2, t=7, h=2, d=4):
    return [torch.randn(b, t, h, d) for _ in range(3)]


def test_backend_table_gives_every_op_and_every_reason(monkeypatch):
    table = uf.available_backends("cpu")
    assert set(table) == set(dispatch.OPS)
    for op, per_backend in table.items():
        assert per_backend["eager"] == []
        assert per_backend["cuda"], (op, "cuda cannot serve CPU tensors")
        for name, reasons in per_backend.items():
            assert all(isinstance(r, str) and r for r in reasons), (op, name)
    # A backend without an implementation of an op says so.
    monkeypatch.setitem(dispatch._REGISTRY, "pos_conv", {"eager": dispatch._REGISTRY["pos_conv"]["eager"]})
    for name in ("triton", "cuda", "cpp"):
        assert "no %s implementation of 'pos_conv' exists yet" % name in uf.available_backends("cpu")["pos_conv"][name]
    text = dispatch.format_backend_table(("cpu",))
    for op in dispatch.OPS:
        assert op in text
    for line in text.splitlines():
        assert not line.rstrip().endswith(" triton"), "auto never picks the interpreter on CPU: " + line


def test_auto_picks_eager_on_cpu_where_no_kernel_can_run():
    q, k, v = _qkv()
    # Dropout: the C++ attention refuses it and auto never takes the Triton interpreter.
    assert dispatch.select("attention", {"q": q, "k": k, "v": v, "dropout_p": 0.1}).backend == "eager"


@pytest.mark.parametrize("name", ["triton", "cuda", "cpp"])
def test_forced_backend_that_cannot_run_raises_with_reasons(name, monkeypatch):
    q, k, v = _qkv()
    # Whatever exists today, a backend without an implementation must refuse with that reason.
    registry = {b: impl for b, impl in dispatch._REGISTRY["attention"].items() if b != name}
    monkeypatch.setitem(dispatch._REGISTRY, "attention", registry)
    with uf.backend(name):
        with pytest.raises(uf.BackendNotSupportedError, match=f"backend '{name}' cannot run 'attention'") as info:
            attention(q, k, v)
    if name == "triton":  # triton is usable on CPU in the test session (TRITON_INTERPRET=1)
        assert f"no {name} implementation of 'attention'" in str(info.value)
    else:  # no extension / not CUDA tensors: backend-level reasons are listed instead
        assert str(info.value).count("\n  - ") >= 1


def test_backend_context_nests_and_restores():
    assert uf.current_backend() == "auto"
    with uf.backend("eager"):
        assert uf.current_backend() == "eager"
        with uf.backend("triton"):
            assert uf.current_backend() == "triton"
        assert uf.current_backend() == "eager"
    assert uf.current_backend() == "auto"


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("UNISPEECH_FAST_BACKEND", "cpp")
    assert uf.current_backend() == "cpp"
    q, k, v = _qkv()
    with pytest.raises(uf.BackendNotSupportedError, match="backend 'cpp' cannot run"):
        attention(q, k, v, dropout_p=0.1)  # the C++ attention has no dropout
    with uf.backend("eager"):  # the context manager wins over the environment
        attention(q, k, v, dropout_p=0.1)


@pytest.fixture
def wrong_cpp_attention(monkeypatch):
    """Register a deliberately wrong 'cpp' attention and pretend the extension loaded."""
    monkeypatch.setattr(dispatch.selection, "backend_reasons", lambda name, device: [])
    previous = dispatch._REGISTRY["attention"].get("cpp")  # the real one, put back after

    def bad(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None, need_weights=False):
        out, w = attention_ref(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights)
        return out + 1e-2, w

    dispatch.register("attention", "cpp")(bad)
    yield
    dispatch._unregister("attention", "cpp")
    if previous is not None:
        dispatch._REGISTRY["attention"]["cpp"] = previous


def test_verify_mode_catches_a_wrong_kernel(wrong_cpp_attention):
    q, k, v = _qkv()
    with uf.backend("cpp"):
        out, _ = attention(q, k, v)  # no verification: wrong answer goes through
        assert not torch.allclose(out, attention_ref(q, k, v)[0])
        with uf.verify():
            with pytest.raises(uf.VerificationError, match=r"attention on backend 'cpp'.*max abs error 1\.0+e-02"):
                attention(q, k, v)
        with uf.verify(atol=2e-2, rtol=0):
            attention(q, k, v)  # within the loosened tolerance


def test_verify_env_var(wrong_cpp_attention, monkeypatch):
    monkeypatch.setenv("UNISPEECH_FAST_VERIFY", "1")
    q, k, v = _qkv()
    with uf.backend("cpp"), pytest.raises(uf.VerificationError):
        attention(q, k, v)


@pytest.mark.parametrize("value,on", [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), ("NO", False), ("off", False),
    (" 0 ", False), ("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" on\n", True),
])
def test_verify_env_var_is_read_as_a_boolean(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("UNISPEECH_FAST_VERIFY", raising=False)
    else:
        monkeypatch.setenv("UNISPEECH_FAST_VERIFY", value)
    assert (dispatch.verify_enabled() is not None) is on
    with uf.verify():
        assert dispatch.verify_enabled() is not None  # the context manager turns it on whatever the variable says


@pytest.mark.parametrize("value", ["2", "enabled", "y", "-1"])
def test_verify_env_var_rejects_other_values(monkeypatch, value):
    monkeypatch.setenv("UNISPEECH_FAST_VERIFY", value)
    with pytest.raises(ValueError, match=rf"UNISPEECH_FAST_VERIFY.*'true'.*'false'.*got '{value}'"):
        dispatch.verify_enabled()
    with pytest.raises(ValueError, match="UNISPEECH_FAST_VERIFY"):
        attention(*_qkv())  # the first op call reports it, as a bad $UNISPEECH_FAST_BACKEND does


def test_verify_passes_for_eager_model():
    config = uf.UniSpeechSatConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                   conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8),
                                   num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    model = uf.UniSpeechSatModel(config).eval()
    with uf.verify():
        model(torch.randn(1, 500))


def test_auto_prefers_a_usable_kernel_backend(wrong_cpp_attention, monkeypatch):
    """Without a measured order (the committed one is this machine's), auto's default order tries a kernel
    backend that can run the call before eager."""
    monkeypatch.setattr(dispatch.selection, "_MEASURED_ORDERS", {})
    q, k, v = _qkv()
    assert dispatch.select("attention", {"q": q, "k": k, "v": v}).backend == "cpp"


def test_auto_follows_a_measured_order(wrong_cpp_attention, monkeypatch):
    """Where benchmarks ranked the backends, auto tries them fastest first; elsewhere the default order."""
    q, k, v = _qkv()
    inputs = {"q": q, "k": k, "v": v}
    monkeypatch.setattr(dispatch.selection, "_MEASURED_ORDERS", {})
    assert dispatch.select("attention", inputs).backend == "cpp"  # default order: cpp before eager
    monkeypatch.setattr(dispatch.selection, "_MEASURED_ORDERS", {(dispatch.CPU_KEY, "attention", "float32", "fwd"): ("eager", "cpp")})
    assert dispatch.auto_order("attention", "cpu", torch.float32) == (("eager", "cpp", "cuda", "triton"), True)
    assert dispatch.select("attention", inputs).backend == "eager"
    # Another dtype, or a call that needs gradients (mode fwd_bwd), was not measured: default order.
    assert dispatch.select("attention", {n: t.double() for n, t in inputs.items()}).backend == "cpp"
    grad_inputs = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    assert dispatch.select("attention", grad_inputs).backend == "cpp"
    with torch.no_grad():
        assert dispatch.select("attention", grad_inputs).backend == "eager"
    assert "eager (measured order)" in dispatch.format_backend_table(("cpu",))
    # An order measured on another CPU kind does not apply here.
    monkeypatch.setattr(dispatch.selection, "_MEASURED_ORDERS", {("cpu:OTHER_ISA", "attention", "float32", "fwd"): ("eager", "cpp")})
    assert dispatch.select("attention", inputs).backend == "cpp"


def test_auto_on_gpu_prefers_triton_then_eager_until_measured(monkeypatch):
    """Issue 16 item 5: no GPU benchmark exists, so auto on CUDA tensors tries the validated Triton kernels,
    then eager (cuDNN/SDPA), and the unmeasured CUDA kernels only after them; info says so."""
    import types

    assert dispatch.auto_order("pos_conv", "cuda", torch.float32) == (("triton", "eager", "cuda", "cpp"), False)
    assert dispatch.auto_order("attention", "cuda", torch.float16, needs_grad=True)[0][:3] == ("triton", "eager", "cuda")
    assert dispatch.auto_order("attention", "cpu", torch.float64)[0] == dispatch.BACKENDS  # CPU order unchanged
    # Every backend usable: the GPU call goes to triton; without triton, to eager, never to cuda first.
    fake = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16)
    monkeypatch.setattr(dispatch.selection, "_first_tensor", lambda inputs: fake)
    usable = {"triton", "eager", "cuda", "cpp"}
    monkeypatch.setattr(dispatch.selection, "_reasons_for",
                        lambda op, name, inputs, device, auto=False: [] if name in usable else ["unusable"])
    assert dispatch.select("attention", {}).backend == "triton"
    usable.discard("triton")
    assert dispatch.select("pos_conv", {}).backend == "eager"
    # A measured GPU order overrides the default one.
    monkeypatch.setattr(dispatch.selection, "_MEASURED_ORDERS", {("cuda", "attention", "float16", "fwd"): ("cuda",)})
    assert dispatch.auto_order("attention", "cuda", torch.float16) == (("cuda", "triton", "eager", "cpp"), True)
    assert dispatch.select("attention", {}).backend == "cuda"
    text = dispatch.format_backend_table(("cpu",))
    assert "on CUDA tensors auto tries triton, eager, cuda, cpp until GPU benchmarks measure an order" in text
