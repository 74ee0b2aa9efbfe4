"""``unispeech_fast.optimize_for_inference``: every class in float32 and bfloat16 against the default
path, the snapshot contract, inference-only errors, and the whole-model error policy against fp64."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

import unispeech_fast as uf
from unispeech_fast import inference
from _tolerance import assert_within_2x_eager
from conftest import ALL_CLASSES, padded_batch, tiny_config_kwargs

# Models a bit larger than conftest's tiniest, so bfloat16 rounding shows as it does at real sizes.
SIZES = dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, conv_dim=(32, 32, 32))


def _model(family: str, head: str, **overrides) -> torch.nn.Module:
    config = getattr(uf, family + "Config")(**tiny_config_kwargs(family, **{**SIZES, **overrides}))
    return getattr(uf, family + head)(config).eval()


def _outputs(out) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of a model output, hidden-state and attention tuples flattened."""
    flat = {}
    for key in out.keys():
        value = out[key]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            flat[key] = value
        elif isinstance(value, tuple):
            flat.update({f"{key}[{i}]": t for i, t in enumerate(value)})
    return flat


def _normwise(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _head_mask(config) -> torch.Tensor:
    mask = torch.ones(config.num_hidden_layers, config.num_attention_heads)
    mask[0, 1] = 0.0
    mask[1, 0] = 0.5
    return mask


@pytest.mark.parametrize("family,head", ALL_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_class_matches_default_path(family, head, dtype):
    model = _model(family, head)
    x, mask = padded_batch([4000, 2600, 1401])
    kwargs = dict(attention_mask=mask, head_mask=_head_mask(model.config), output_hidden_states=True,
                  output_attentions=True)
    with torch.no_grad():
        expected = _outputs(model(x, **kwargs))
    optimized = uf.optimize_for_inference(model, dtype)
    got = _outputs(optimized(x, **kwargs))
    assert got.keys() == expected.keys()
    for key, ref in expected.items():
        assert got[key].dtype == torch.float32, key
        assert got[key].shape == ref.shape, key
        if dtype == torch.float32:
            torch.testing.assert_close(got[key], ref, atol=2e-5, rtol=1e-5, msg=key)
        else:
            assert _normwise(got[key], ref) <= 1.5e-2, (key, _normwise(got[key], ref))
    if dtype == torch.bfloat16:
        # The bf16 target on the last hidden state (normwise, against the fp32 model).
        last = f"hidden_states[{model.config.num_hidden_layers}]"
        assert _normwise(got[last], expected[last]) <= 5e-3, _normwise(got[last], expected[last])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stable", [False, True], ids=["post_ln", "stable_ln"])
def test_bf16_target_and_fp32_parity_on_both_layer_kinds(dtype, stable):
    model = _model("UniSpeechSat", "Model", hidden_size=128, num_attention_heads=2, intermediate_size=256,
                   num_hidden_layers=3, do_stable_layer_norm=stable, feat_extract_norm="layer" if stable else "group")
    x = torch.randn(2, 8000)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    got = uf.optimize_for_inference(model, dtype)(x).last_hidden_state
    err = _normwise(got, ref)
    assert err <= (5e-3 if dtype == torch.bfloat16 else 1e-6), err


def test_long_input_crossing_tile_boundaries():
    model = _model("UniSpeechSat", "ForCTC")
    x, mask = padded_batch([20000, 13333])
    with torch.no_grad():
        expected = model(x, attention_mask=mask).logits
    optimized = uf.optimize_for_inference(model)
    extractor = optimized.unispeech_sat.feature_extractor
    assert isinstance(extractor, inference.InferenceFeatureEncoder)
    extractor.tile_frames = 7  # 7 output frames per tile: many tiles, a short last one
    torch.testing.assert_close(optimized(x, attention_mask=mask).logits, expected, atol=2e-5, rtol=1e-5)


def test_packed_weights_replace_the_dense_layers():
    model = _model("UniSpeechSat", "Model")
    optimized = uf.optimize_for_inference(model, torch.bfloat16)
    layer = optimized.encoder.layers[0]
    assert isinstance(layer, inference.InferenceEncoderLayer)
    assert layer.qkv.packed_weight.is_mkldnn and layer.qkv.out_features == 3 * model.config.hidden_size
    assert layer.qkv.dtype == torch.bfloat16 and layer.intermediate.activation == "gelu"
    assert layer.attention_dtype == torch.bfloat16  # q, k, v in bf16 to the attention kernel
    assert optimized.feature_projection.projection.dtype == torch.float32
    assert isinstance(optimized.encoder.pos_conv_embed, inference.InferencePositionalConv)
    assert optimized.encoder.pos_conv_embed.packed_weight.is_mkldnn
    extractor = optimized.feature_extractor  # packed matmuls, float32 even in a bf16 snapshot (error budget)
    assert isinstance(extractor, inference.InferenceFeatureEncoder) and extractor.dtype == torch.float32
    assert all(linear.packed_weight.is_mkldnn and linear.dtype == torch.float32 for linear in extractor.linears)
    assert optimized.optimized_dtype == torch.bfloat16
    assert isinstance(optimized, uf.UniSpeechSatModel)


# ------------------------------------------------------------------------------------------ snapshot
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_snapshot_ignores_later_changes_and_leaves_the_original_alone(dtype):
    model = _model("UniSpeechSat", "ForCTC").train()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3000)
    optimized = uf.optimize_for_inference(model, dtype)
    # The original is not modified: same weights, still training, still requires grad, same class.
    assert model.training and type(model) is uf.UniSpeechSatForCTC
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    model.eval()
    before = optimized(x).logits.clone()
    with torch.no_grad():
        original_before = model(x).logits
        attention = model.unispeech_sat.encoder.layers[0].attention
        attention.q_proj.weight.add_(0.5)                                 # in-place update
        attention.out_proj.weight.data.mul_(2.0)                          # write through .data
        model.unispeech_sat.encoder.layers[1].feed_forward.output_dense.bias.data.fill_(3.0)
        model.unispeech_sat.encoder.pos_conv_embed.conv.parametrizations.weight.original0.mul_(3.0)
        model.unispeech_sat.feature_projection.projection.weight.data.zero_()
        original_after = model(x).logits
    assert not torch.allclose(original_after, original_before)  # the changes do reach the original
    torch.testing.assert_close(optimized(x).logits, before, atol=0, rtol=0)
    other = _model("UniSpeechSat", "ForCTC")
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(optimized(x).logits, before, atol=0, rtol=0)


def test_snapshot_does_not_share_storage_with_the_original():
    model = _model("UniSpeech", "Model")
    optimized = uf.optimize_for_inference(model)
    original = {t.data_ptr() for t in model.state_dict().values()}
    # nn.Module's own state_dict: the snapshot's refuses (its packed weights are not in it)
    kept = {t.data_ptr() for t in torch.nn.Module.state_dict(optimized, keep_vars=True).values()}
    assert not (original & kept)


# ------------------------------------------------------------------------- what a rebuild from weights drops
class _LoraLinear(torch.nn.Module):
    """A PEFT-style adapter: exposes the base layer's weight and bias, adds a low-rank update."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_a = torch.nn.Linear(base.in_features, 2, bias=False)
        self.lora_b = torch.nn.Linear(2, base.out_features, bias=False)
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


def _wrap(owner, name):
    setattr(owner, name, _LoraLinear(getattr(owner, name)))


def _hook(module):
    module.register_forward_hook(lambda m, args, out: out)


class _MyEncoderLayer(uf.modules.EncoderLayer):
    pass


_DROPPED = {  # case: (the change, a literal part of the error)
    "lora on intermediate_dense": (lambda b: _wrap(b.encoder.layers[0].feed_forward, "intermediate_dense"),
                                   "layers.0.feed_forward.intermediate_dense (_LoraLinear) is not one of them"),
    "lora on output_dense": (lambda b: _wrap(b.encoder.layers[1].feed_forward, "output_dense"),
                             "layers.1.feed_forward.output_dense (_LoraLinear) is not one of them"),
    "lora on q_proj": (lambda b: _wrap(b.encoder.layers[0].attention, "q_proj"), "attention.q_proj (_LoraLinear)"),
    "lora on the feature projection": (lambda b: _wrap(b.feature_projection, "projection"),
                                       "feature_projection.projection (_LoraLinear)"),
    "hook on intermediate_dense": (lambda b: _hook(b.encoder.layers[0].feed_forward.intermediate_dense),
                                   "hooks on unispeech_sat.encoder.layers.0.feed_forward.intermediate_dense (Linear)"),
    "hook on the feature projection's linear": (lambda b: _hook(b.feature_projection.projection),
                                                "hooks on unispeech_sat.feature_projection.projection (Linear)"),
    "hook on an encoder layer": (lambda b: _hook(b.encoder.layers[1]),
                                 "hooks on unispeech_sat.encoder.layers.1 (EncoderLayer) would not run"),
    "hook on attention": (lambda b: _hook(b.encoder.layers[0].attention), "layers.0.attention (Attention) would not"),
    "pre-hook on the feature encoder": (lambda b: b.feature_extractor.register_forward_pre_hook(lambda m, a: a),
                                        "hooks on unispeech_sat.feature_extractor (FeatureEncoder)"),
    "hook on the positional conv": (lambda b: _hook(b.encoder.pos_conv_embed),
                                    "hooks on unispeech_sat.encoder.pos_conv_embed (PositionalConvEmbedding)"),
    "forward replaced on an instance": (lambda b: setattr(b.encoder.layers[0].feed_forward, "forward", lambda x: x),
                                        "the forward replaced on the instance "
                                        "unispeech_sat.encoder.layers.0.feed_forward (FeedForward) would not run"),
    "subclassed encoder layer": (lambda b: b.encoder.layers.__setitem__(0, _MyEncoderLayer(b.config)),
                                 "layers.0 (_MyEncoderLayer) is not one of them"),
    "activation changed": (lambda b: setattr(b.encoder.layers[0].feed_forward, "intermediate_act_fn", torch.tanh),
                           "layers.0.feed_forward.intermediate_act_fn is not config.hidden_act ('gelu')"),
}


@pytest.mark.parametrize("case", list(_DROPPED))
def test_refuses_what_a_rebuild_from_weights_would_drop(case):
    """Adapters, wrappers, hooks and swapped modules on what the snapshot rebuilds from weights are refused
    by name; the default path honours them, so a snapshot without them would differ silently."""
    model = _model("UniSpeechSat", "ForCTC")
    change, message = _DROPPED[case]
    change(model.unispeech_sat)
    with pytest.raises(TypeError, match=re.escape(message)):
        uf.optimize_for_inference(model)


def test_hooks_on_deep_copied_children_still_run():
    """The encoder layers' LayerNorms are deep-copied into the snapshot, hooks included: no refusal, same output."""
    model = _model("UniSpeechSat", "Model")
    calls = []
    model.encoder.layers[0].final_layer_norm.register_forward_hook(lambda m, args, out: calls.append(1) or out * 0.5)
    x = torch.randn(1, 3000)
    with torch.no_grad():
        expected = model(x).last_hidden_state
    optimized = uf.optimize_for_inference(model)
    got = optimized(x).last_hidden_state
    assert len(calls) == 2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ inference only
def test_training_a_snapshot_raises():
    model = _model("UniSpeech", "ForCTC")
    optimized = uf.optimize_for_inference(model)
    assert not optimized.training
    optimized.eval()  # allowed, a no-op
    with pytest.raises(uf.InferenceOnlyError, match="train"):
        optimized.train()
    with pytest.raises(uf.InferenceOnlyError, match="optimize_for_inference"):
        torch.optim.SGD(optimized.parameters(), lr=0.1)
    with pytest.raises(uf.InferenceOnlyError):
        optimized.requires_grad_(True)
    x = torch.randn(1, 3000, requires_grad=True)
    with pytest.raises(uf.InferenceOnlyError, match="input_values|argument 0"):
        optimized(x)
    out = optimized(x.detach()).logits
    assert not out.requires_grad
    with pytest.raises(RuntimeError):
        out.sum().backward()
    with pytest.raises(uf.InferenceOnlyError, match="load_state_dict"):
        optimized.load_state_dict(model.state_dict())
    with pytest.raises(uf.InferenceOnlyError, match="state_dict is unavailable"):
        optimized.state_dict()
    with pytest.raises(uf.InferenceOnlyError, match="cannot pickle or torch.save"):
        torch.save(optimized, io.BytesIO())
    with pytest.raises(uf.InferenceOnlyError, match="cannot deepcopy"):
        copy.deepcopy(optimized)
    with pytest.raises(uf.InferenceOnlyError, match="move or cast"):
        optimized.to(torch.float64)
    with pytest.raises(uf.InferenceOnlyError, match="move or cast"):
        optimized.double()
    assert optimized.to("cpu") is optimized and optimized.cpu() is optimized


def test_bad_arguments_name_what_was_expected():
    model = _model("UniSpeech", "Model")
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        uf.optimize_for_inference(model, torch.float16)
    with pytest.raises(TypeError, match="model must be a unispeech_fast model"):
        uf.optimize_for_inference(torch.nn.Linear(2, 2))
    transformers = pytest.importorskip("transformers")
    theirs = transformers.UniSpeechSatForCTC(transformers.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat")))
    with pytest.raises(TypeError, match=r"got transformers' UniSpeechSatForCTC; load the checkpoint with "
                                        r"unispeech_fast\.UniSpeechSatForCTC\.from_pretrained"):
        uf.optimize_for_inference(theirs)
    with pytest.raises(ValueError, match="float32 weights"):
        uf.optimize_for_inference(copy.deepcopy(model).double())
    with pytest.raises(TypeError, match="already an optimize_for_inference snapshot"):
        uf.optimize_for_inference(uf.optimize_for_inference(model))
    with pytest.raises(TypeError, match="input_values has dtype torch.float64"):
        uf.optimize_for_inference(model)(torch.randn(1, 3000, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ error policy
@pytest.mark.parametrize("family,head", ALL_CLASSES)
def test_whole_model_error_against_fp64_within_2x_of_eager_fp32(family, head):
    """The optimized path's accuracy policy: its float32 error against an fp64 run of the same model is
    at most 2x the eager backend's float32 error (eager runs transformers' arithmetic), or eager's error plus
    two float32 roundings of the output's own magnitude where that is larger: a pooled head's logits are four
    numbers whose max error is one or two ulps, where "2x" alone compares 2 ulps with 1 (seen: 1.44e-8
    against eager's 6.99e-9). On hidden states (errors ~2e-6, two roundings ~1e-6) the rule stays 2x."""
    model = _model(family, head, hidden_size=128, num_attention_heads=2, intermediate_size=512)
    x, mask = padded_batch([6000, 4111])
    model64 = copy.deepcopy(model).double()
    with torch.no_grad(), uf.backend("eager"):
        ref = _outputs(model64(x.double(), attention_mask=mask, output_hidden_states=True))
        eager = _outputs(model(x, attention_mask=mask, output_hidden_states=True))
    got = _outputs(uf.optimize_for_inference(model)(x, attention_mask=mask, output_hidden_states=True))
    last = f"hidden_states[{model.config.num_hidden_layers}]"
    for key in {last, next(iter(ref))}:
        eager_err = (eager[key].double() - ref[key]).abs().max().item()
        ours_err = (got[key].double() - ref[key]).abs().max().item()
        two_ulps = 2 * torch.finfo(torch.float32).eps * ref[key].abs().max().item()
        print(f"{family}{head} {key}: eager fp32 {eager_err:.2e}, optimized fp32 {ours_err:.2e}, two ulps {two_ulps:.2e}")
        assert ours_err <= max(2 * eager_err, eager_err + two_ulps), (key, ours_err, eager_err, two_ulps)


def test_runs_under_inference_mode_and_no_grad():
    model = _model("UniSpeechSat", "ForXVector")
    optimized = uf.optimize_for_inference(model, torch.bfloat16)
    x = torch.randn(2, 3000)
    expected = optimized(x).logits
    with torch.inference_mode():
        torch.testing.assert_close(optimized(x).logits, expected, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("hidden_act", ["relu", "gelu_new"])
def test_other_activations_fused_or_applied(hidden_act):
    model = _model("UniSpeech", "ForCTC", hidden_act=hidden_act)
    x, mask = padded_batch([3000, 2222])
    with torch.no_grad():
        expected = model(x, attention_mask=mask).logits
    optimized = uf.optimize_for_inference(model)
    layer = optimized.unispeech.encoder.layers[0]
    assert (layer.intermediate.activation, layer.intermediate_act is None) == (
        ("relu", True) if hidden_act == "relu" else (None, False))
    torch.testing.assert_close(optimized(x, attention_mask=mask).logits, expected, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ feature encoder
def _feature_encoder(norm: str, kernels, strides, channels=32) -> torch.nn.Module:
    config = uf.UniSpeechSatConfig(**tiny_config_kwargs(
        "UniSpeechSat", conv_dim=(channels,) * len(kernels), conv_kernel=kernels, conv_stride=strides,
        feat_extract_norm=norm, conv_bias=True))
    encoder = uf.UniSpeechSatModel(config).eval().feature_extractor
    with torch.no_grad():  # non-trivial norm affines, so a wrong fold shows
        for layer in encoder.conv_layers:
            if layer.layer_norm is not None:
                layer.layer_norm.weight.uniform_(0.5, 1.5)
                layer.layer_norm.bias.uniform_(-0.5, 0.5)
    return encoder


def _extractor_ref(encoder, x: torch.Tensor) -> torch.Tensor:
    layers = list(encoder.conv_layers)
    cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
    return uf.ops.feature_extractor_ref(
        x, [cast(layer.conv.weight) for layer in layers], [cast(layer.conv.bias) for layer in layers],
        [cast(None if layer.layer_norm is None else layer.layer_norm.weight) for layer in layers],
        [cast(None if layer.layer_norm is None else layer.layer_norm.bias) for layer in layers],
        [layer.conv.stride[0] for layer in layers], encoder.norm_type, encoder.activation, 1e-5)


# kernel > stride (windows overlap: one copy), kernel == stride (a free view), kernel < stride (skipped samples)
_STACKS = {"k>s": ((10, 3, 3, 2), (5, 2, 2, 2)), "k=s": ((4, 2, 2), (4, 2, 2)), "k<s": ((5, 2, 3), (5, 3, 4))}


@pytest.mark.parametrize("norm", ["group", "layer"])
@pytest.mark.parametrize("stack", list(_STACKS))
@pytest.mark.parametrize("tile_frames", [1, 7, 10_000])
def test_feature_encoder_fp32_against_fp64(norm, stack, tile_frames):
    """The time-major matmul feature encoder in float32, with a padded batch (zeros count in the group
    norm's statistics, per row) and lengths that leave a short last tile: within 2x eager's error."""
    encoder = _feature_encoder(norm, *_STACKS[stack])
    x, _ = padded_batch([4001, 2917, 3333])
    fast = inference.InferenceFeatureEncoder(encoder, torch.float32, tile_frames)
    with torch.no_grad():
        got, eager, ref = fast(x), _extractor_ref(encoder, x), _extractor_ref(encoder, x.double())
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert_within_2x_eager(f"feature encoder {norm} {stack}", got, eager, ref)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_feature_encoder_bf16_against_fp64(norm):
    """bfloat16 matmuls after layer 0 (fp32 norms): within 2x the error of the whole stack run in bfloat16."""
    encoder = _feature_encoder(norm, (10, 3, 3, 2, 2), (5, 2, 2, 2, 2), channels=64)
    x, _ = padded_batch([9001, 7777])
    fast = inference.InferenceFeatureEncoder(encoder, torch.bfloat16, 5)
    with torch.no_grad():
        got, ref = fast(x), _extractor_ref(encoder, x.double())
        eager_bf16 = _extractor_ref(encoder, x.bfloat16())
    assert got.dtype == torch.float32
    assert_within_2x_eager(f"bf16 feature encoder {norm}", got, eager_bf16, ref, floor=0.0)
    assert _normwise(got, ref) < 1e-2


def test_feature_encoder_silent_and_constant_rows():
    """A row of zeros (a fully padded batch row) and a constant row: zero variance, as in eager's group norm."""
    encoder = _feature_encoder("group", *_STACKS["k>s"])
    x = torch.zeros(3, 2000)
    x[1] = 0.25
    x[2] = torch.randn(2000)
    with torch.no_grad():
        got, eager = inference.InferenceFeatureEncoder(encoder, torch.float32)(x), _extractor_ref(encoder, x)
        ref = _extractor_ref(encoder, x.double())
    assert_within_2x_eager("feature encoder, silent rows", got, eager, ref)


def test_feature_encoder_group_norm_statistics_of_long_rows():
    """The group norm's statistics come from the windows' moments, merged chunk by chunk (Chan): a row longer
    than one chunk, far from zero mean, matches torch.var_mean of the conv output."""
    w = torch.randn(6, 1, 5, dtype=torch.float64)
    x = 3.0 + torch.randn(2, 400_003, dtype=torch.float64)
    mean, cov = inference._window_moments(x, 5, 3, chunk=1000)
    h = torch.nn.functional.conv1d(x[:, None], w, stride=3)
    var_ref, mean_ref = torch.var_mean(h, dim=-1, unbiased=False)
    w2 = w[:, 0]
    torch.testing.assert_close(mean @ w2.T, mean_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.einsum("ck,bkl,cl->bc", w2, cov, w2), var_ref, rtol=1e-10, atol=1e-12)


def test_feature_encoder_rejects_short_input_and_bad_tiles():
    encoder = _feature_encoder("group", *_STACKS["k>s"])
    with pytest.raises(ValueError, match="tile_frames must be a positive int"):
        inference.InferenceFeatureEncoder(encoder, torch.float32, 0)
    fast = inference.InferenceFeatureEncoder(encoder, torch.float32)
    with pytest.raises(ValueError, match="input_values has 20 samples, fewer than the receptive field"):
        fast(torch.randn(1, 20))


# ------------------------------------------------------------------------------------------ positional conv
@pytest.mark.parametrize("kernel,groups,activation", [(16, 2, "gelu"), (7, 4, "gelu"), (10, 1, "relu"),
                                                     (5, 2, "gelu_new")])
@pytest.mark.parametrize("frames", [1, 13, 129])
def test_positional_conv_against_fp64(kernel, groups, activation, frames):
    """oneDNN's grouped conv on the channels-last view, bias and GELU/ReLU fused (others applied after),
    even kernels dropping the extra frame: within 2x eager's error, batch of 3."""
    config = uf.UniSpeechSatConfig(**tiny_config_kwargs(
        "UniSpeechSat", hidden_size=32, num_attention_heads=2, num_conv_pos_embeddings=kernel,
        num_conv_pos_embedding_groups=groups, feat_extract_activation=activation))
    module = uf.UniSpeechSatModel(config).eval().encoder.pos_conv_embed
    fast = inference.InferencePositionalConv(module)
    assert fast.activation is None if activation in ("gelu", "relu") else fast.activation is not None
    x = torch.randn(3, frames, 32)
    with torch.no_grad(), uf.backend("eager"):
        got, eager = fast(x), module(x)
        ref = copy.deepcopy(module).double()(x.double())
    assert got.shape == x.shape
    assert_within_2x_eager(f"pos conv k{kernel} g{groups} {activation}", got, eager, ref)


def test_positional_conv_and_projection_in_bf16_for_the_budget_benchmark():
    """The bfloat16 variants benchmarks/cpu_engine_bf16_budget.py measures: float32 in and out, error within
    2x of the same module run in bfloat16 by eager PyTorch."""
    model = _model("UniSpeechSat", "Model")
    pos, proj = model.encoder.pos_conv_embed, model.feature_projection
    h, feats = torch.randn(2, 37, 64), torch.randn(2, 37, 32)
    with torch.no_grad(), uf.backend("eager"):
        got = inference.InferencePositionalConv(pos, torch.bfloat16)(h)
        eager = copy.deepcopy(pos).bfloat16()(h.bfloat16())
        ref = copy.deepcopy(pos).double()(h.double())
        got_proj, got_normed = inference.InferenceFeatureProjection(proj, torch.bfloat16)(feats)
        eager_proj = copy.deepcopy(proj).bfloat16()(feats.bfloat16())[0]
        ref_proj = copy.deepcopy(proj).double()(feats.double())[0]
    assert got.dtype == got_proj.dtype == got_normed.dtype == torch.float32
    assert_within_2x_eager("bf16 pos conv", got, eager, ref, floor=0.0)
    assert_within_2x_eager("bf16 feature projection", got_proj, eager_proj, ref_proj, floor=0.0)


@pytest.mark.parametrize("stable", [False, True], ids=["post_ln", "stable_ln"])
def test_bf16_snapshot_with_fp32_attention_stays_within_the_target(stable):
    """``attention_dtype`` switched to float32 (q, k, v upcast before the attention kernel), padded batch
    and head mask: still within the 5e-3 normwise target against the float32 model (the default, bf16
    attention, is checked by the every-class tests)."""
    model = _model("UniSpeechSat", "Model", do_stable_layer_norm=stable)
    x, mask = padded_batch([4000, 2600])
    kwargs = dict(attention_mask=mask, head_mask=_head_mask(model.config))
    with torch.no_grad():
        ref = model(x, **kwargs).last_hidden_state
    optimized = uf.optimize_for_inference(model, torch.bfloat16)
    for layer in optimized.encoder.layers:
        layer.attention_dtype = torch.float32
    got = optimized(x, **kwargs).last_hidden_state
    assert got.dtype == torch.float32
    assert _normwise(got, ref) <= 5e-3
