"""Reliability under every way users touch a model (issue 10, model-level items).

* Weight updates of every kind reach the next forward, on every CPU-runnable backend: the default
  forward path keeps no derived-weight cache that could disagree with the parameters.
* ``torch.inference_mode()``: models run inside it work, and an inference-mode forward does not poison
  later autograd. Models built or loaded inside it run inside it and, after it, without autograd (no_grad,
  inference_mode, or frozen parameters); with grad mode on and trainable parameters torch refuses them.
* ``backend(...)`` is a context variable: threads started inside the block do not inherit it.

Run on its own: ``.venv/bin/pytest -q tests/test_reliability.py``. ``patch()`` following a transformers
model is in ``tests/test_reliability_patch.py``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import threading

import pytest
import torch

import unispeech_fast as uf
from conftest import padded_batch, tiny_config_kwargs
from unispeech_fast import dispatch
from unispeech_fast.ops.attention import attention_ref

NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                     layerdrop=0.0, mask_time_prob=0.0, final_dropout=0.0)
# Backends that run on CPU here; triton runs under Triton's interpreter (tiny shapes only).
BACKENDS = ["eager", "cpp", "auto", "triton"]
# Backends that can run a whole model's backward (cpp's oneDNN linear is inference-only).
GRAD_BACKENDS = ["eager", "auto", "triton"]
LENGTHS = [700, 500]


@contextlib.contextmanager
def _on(backend: str):
    """``uf.backend(backend)``; for ``cpp`` while it has no attention kernel, the whole model still runs
    every other op on cpp, with attention on the eager reference (registered for this block only)."""
    if backend != "cpp" or "cpp" in dispatch.implemented_backends()["attention"]:
        with uf.backend(backend):
            yield
        return
    dispatch.register("attention", "cpp")(attention_ref)
    try:
        with uf.backend("cpp"):
            yield
    finally:
        dispatch._unregister("attention", "cpp")


def _model(**overrides) -> uf.UniSpeechSatModel:
    config = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat", **NO_RANDOMNESS, **overrides))
    return uf.UniSpeechSatModel(config).eval()


def _fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A model built from scratch with ``model``'s current parameter values: it has never run, so it
    cannot hold anything derived from older values."""
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def _forward(model, backend, x, mask):
    with torch.no_grad(), _on(backend):
        return model(x, attention_mask=mask).last_hidden_state


# Parameters a fused or derived weight is made from: the q/k/v projections (fused GEMM), the positional
# conv's weight norm (g and v, folded by the kernels), a feature-encoder conv, a dense layer.
PARAMS = [
    "encoder.layers.0.attention.q_proj.weight",
    "encoder.layers.1.attention.v_proj.bias",
    "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
    "feature_extractor.conv_layers.0.conv.weight",
    "encoder.layers.0.feed_forward.output_dense.weight",
]


def _update(model: torch.nn.Module, name: str, how: str) -> None:
    param = model.get_parameter(name)
    new = param.detach() * -1.5 + 0.25
    if how == "data_write":  # old optimisers, EMA / weight averaging: no version-counter bump
        param.data.copy_(new)
    elif how == "data_assign":
        param.data = new.clone()
    elif how == "inplace_no_grad":
        with torch.no_grad():
            param.copy_(new)
    elif how == "load_state_dict_assign":
        state = model.state_dict()
        state[name] = new.clone()
        model.load_state_dict(state, assign=True)
    elif how == "new_parameter":
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(new.clone()))
    else:
        raise AssertionError(how)


HOWS = ["data_write", "data_assign", "inplace_no_grad", "load_state_dict_assign", "new_parameter"]
# The Triton interpreter is slow: under triton the ``.data`` write (the case a version-keyed cache misses)
# covers every parameter; the other backends take every way.
UPDATE_CASES = [(b, n, h) for b in BACKENDS for n in PARAMS for h in HOWS if b != "triton" or h == "data_write"]


@pytest.mark.parametrize("backend,name,how", UPDATE_CASES,
                         ids=[f"{b}-{n.replace('parametrizations.weight.', '')}-{h}" for b, n, h in UPDATE_CASES])
def test_every_weight_update_reaches_the_next_forward(backend, name, how):
    model = _model()
    x, mask = padded_batch(LENGTHS)
    before = _forward(model, backend, x, mask)
    _forward(model, backend, x, mask)  # a second call: anything cached is now warm
    _update(model, name, how)
    after = _forward(model, backend, x, mask)
    expected = _forward(_fresh_copy(model), backend, x, mask)
    assert not torch.equal(after, before), "the update must change the output"
    torch.testing.assert_close(after, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_module_keeps_derived_tensors_between_calls(backend):
    """Structural check of the rule: after forwards with and without grad, no module holds a tensor
    outside its registered parameters and buffers, and no op keeps a module-level weight cache."""
    model = _model()
    x, mask = padded_batch(LENGTHS)
    _forward(model, backend, x, mask)
    with torch.inference_mode(), _on(backend):
        model(x, attention_mask=mask)
    for path, module in model.named_modules():
        for key, value in vars(module).items():
            items = value if isinstance(value, (tuple, list)) else (value,)
            assert not any(isinstance(v, torch.Tensor) for v in items), f"{path or 'model'}.{key} holds a tensor"
    import importlib

    for name in ("", ".reference", ".triton", ".extension"):  # the op package and each of its modules
        pos_conv_mod = importlib.import_module("unispeech_fast.ops.pos_conv" + name)
        # (module dunders such as ``__cached__``, the path of its bytecode, are not caches of derived tensors)
        assert not [k for k, v in vars(pos_conv_mod).items()
                    if "CACHE" in k.upper() and not k.startswith("__") and v], "pos_conv keeps a cache"


# ---------------------------------------------------------------------------------------------- inference_mode
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_built_inside_inference_mode_runs_inside_and_outside(backend):
    x, mask = padded_batch(LENGTHS)
    torch.manual_seed(1)
    reference = _model()
    with torch.inference_mode():
        torch.manual_seed(1)
        model = _model()  # every parameter is an inference tensor (no version counter)
        with _on(backend):
            inside = model(x, attention_mask=mask).last_hidden_state
    outside = _forward(model, backend, x, mask)  # no_grad outside the block: allowed by PyTorch
    expected = _forward(reference, backend, x, mask)
    torch.testing.assert_close(inside, expected, atol=0, rtol=0)
    torch.testing.assert_close(outside, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "cpp", "auto"])
def test_model_loaded_inside_inference_mode_runs(backend, tmp_path):
    source = _model()
    source.save_pretrained(tmp_path / "ckpt")
    x, mask = padded_batch(LENGTHS)
    with torch.inference_mode():
        model = uf.UniSpeechSatModel.from_pretrained(tmp_path / "ckpt").eval()
        with _on(backend):
            out = model(x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, _forward(source, backend, x, mask), atol=0, rtol=0)


@pytest.mark.parametrize("how", ["built", "loaded"])
@pytest.mark.parametrize("backend", ["eager", "cpp", "auto"])
def test_model_made_inside_inference_mode_after_the_block(backend, how, tmp_path):
    """README, "Correctness guarantees": after the block such a model runs under no_grad or inference_mode or
    with frozen parameters; a forward with grad mode on and parameters that require grad raises torch's error
    (its parameters are inference tensors)."""
    torch.manual_seed(1)
    source = _model()
    source.save_pretrained(tmp_path / "ckpt")
    x, mask = padded_batch(LENGTHS)
    with torch.inference_mode():
        torch.manual_seed(1)
        model = _model() if how == "built" else uf.UniSpeechSatModel.from_pretrained(tmp_path / "ckpt").eval()
    assert all(p.is_inference() and p.requires_grad for p in model.parameters())
    expected = _forward(source, backend, x, mask)
    torch.testing.assert_close(_forward(model, backend, x, mask), expected, atol=0, rtol=0)  # no_grad
    with torch.inference_mode(), _on(backend):
        torch.testing.assert_close(model(x, attention_mask=mask).last_hidden_state, expected, atol=0, rtol=0)
    with _on(backend), pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        model(x, attention_mask=mask)
    model.requires_grad_(False)
    with _on(backend):
        torch.testing.assert_close(model(x, attention_mask=mask).last_hidden_state, expected, atol=0, rtol=0)


def test_audio_load_model_and_embed_inside_inference_mode(tmp_path):
    from unispeech_fast import audio

    source = _model()
    source.save_pretrained(tmp_path / "ckpt")
    waves = [torch.randn(n).numpy() for n in (4000, 3000)]
    expected = audio.embed(audio.load_model(tmp_path / "ckpt"), waves, sample_rate=16000)
    with torch.inference_mode():
        model = audio.load_model(tmp_path / "ckpt")
        got = audio.embed(model, waves, sample_rate=16000)
        again = audio.embed(model, waves, sample_rate=16000)
    for g, a, e in zip(got, again, expected):
        torch.testing.assert_close(torch.from_numpy(g), torch.from_numpy(e), atol=0, rtol=0)
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(e), atol=0, rtol=0)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_inference_mode_forward_does_not_break_later_input_gradients(backend):
    """Frozen model, input that requires grad, after an evaluation pass under inference_mode."""
    model = _model()
    model.requires_grad_(False)
    x, mask = padded_batch(LENGTHS)
    with torch.inference_mode(), _on(backend):
        model(x, attention_mask=mask)
    xg = x.clone().requires_grad_()
    with _on(backend):
        model(xg, attention_mask=mask).last_hidden_state.square().sum().backward()
    fresh = _fresh_copy(model).requires_grad_(False)
    xr = x.clone().requires_grad_()
    with _on(backend):
        fresh(xr, attention_mask=mask).last_hidden_state.square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    torch.testing.assert_close(xg.grad, xr.grad, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_layer_norm_only_fine_tuning_after_an_inference_mode_pass(backend):
    model = _model()
    for name, p in model.named_parameters():
        p.requires_grad_("layer_norm" in name)
    x, mask = padded_batch(LENGTHS)
    with torch.inference_mode(), _on(backend):
        model(x, attention_mask=mask)
    with _on(backend):
        model(x, attention_mask=mask).last_hidden_state.square().sum().backward()
    fresh = _fresh_copy(model)
    for name, p in fresh.named_parameters():
        p.requires_grad_("layer_norm" in name)
    with _on(backend):
        fresh(x, attention_mask=mask).last_hidden_state.square().sum().backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("layer_norm" in n for n in trained)
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=n)


# ---------------------------------------------------------------------------------------------- threads
def test_backend_setting_is_per_context_and_threads_do_not_inherit_it():
    """Documented contract (README, "Correctness guarantees"): ``backend(...)`` sets a context variable.
    A plain thread or a thread pool started inside the block runs the default (``auto``, or
    ``$UNISPEECH_FAST_BACKEND``); ``contextvars.copy_context().run`` carries the setting over."""
    default = uf.current_backend()
    seen: dict[str, str] = {}
    with uf.backend("eager"):
        assert uf.current_backend() == "eager"
        thread = threading.Thread(target=lambda: seen.__setitem__("thread", uf.current_backend()))
        thread.start()
        thread.join()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            seen["pool"] = pool.submit(uf.current_backend).result()
            ctx = contextvars.copy_context()
            seen["copied"] = pool.submit(ctx.run, uf.current_backend).result()
    assert seen == {"thread": default, "pool": default, "copied": "eager"}
    assert uf.current_backend() == default


# ---------------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_keeps_the_default_paths_dense_kernels():
    """Under ``torch.compile`` the dense layers run the same registered oneDNN op as the default path
    (not the compiler's own F.linear), with the same outputs."""
    import collections

    reasons = dispatch.available_backends("cpu")["linear"]["cpp"]
    assert not reasons, f"the cpp linear cannot run here: {reasons}"
    config = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat", **NO_RANDOMNESS))
    model = uf.UniSpeechSatForCTC(config).eval()
    x, mask = padded_batch(LENGTHS)
    targets: collections.Counter = collections.Counter()

    def recording_backend(gm, example_inputs):
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), uf.backend("auto"):
        ref = model(x, attention_mask=mask).logits
        out = torch.compile(model, backend=recording_backend, fullgraph=True)(x, attention_mask=mask).logits
    torch._dynamo.reset()
    # feature projection + per layer q, k, v, out and the two feed-forward layers (the CTC head is F.linear
    # on the default path too)
    assert targets["unispeech_fast.onednn_linear.default"] == 1 + 6 * config.num_hidden_layers, dict(targets)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
