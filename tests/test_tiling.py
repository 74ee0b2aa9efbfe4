"""The tiled long-audio feature extractor equals the untiled one, and models use it by themselves."""

from __future__ import annotations

import pytest
import torch

import unispeech_fast as uf
from unispeech_fast import ops, tiling
from unispeech_fast.modules import CONV_NORM_EPS
from conftest import ALL_CLASSES, padded_batch, tiny_config_kwargs

KERNELS, STRIDES = (10, 3, 2), (5, 2, 2)
RECEPTIVE = tiling.input_span(0, 1, KERNELS, STRIDES)[1]
PER_FRAME = 5 * 2 * 2


def _params(norm_type: str, bias: bool, channels: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    weights, biases, gammas, betas = [], [], [], []
    c_in = 1
    for i, k in enumerate(KERNELS):
        weights.append(torch.randn(channels, c_in, k, generator=g, dtype=dtype) / (c_in * k) ** 0.5)
        biases.append(torch.randn(channels, generator=g, dtype=dtype) if bias else None)
        has_norm = norm_type == "layer" or i == 0
        gammas.append(1 + 0.1 * torch.randn(channels, generator=g, dtype=dtype) if has_norm else None)
        betas.append(0.1 * torch.randn(channels, generator=g, dtype=dtype) if has_norm else None)
        c_in = channels
    return weights, biases, gammas, betas


def test_input_span_matches_the_receptive_field():
    assert RECEPTIVE == 10 + 5 * ((3 - 1) + 2 * (2 - 1))  # R = k0 + s0 * (k1 - 1 + s1 * (k2 - 1))
    assert tiling.input_span(3, 5, KERNELS, STRIDES) == (3 * PER_FRAME, 4 * PER_FRAME + RECEPTIVE)
    assert tiling.output_frames(RECEPTIVE, KERNELS, STRIDES) == 1
    assert tiling.output_frames(RECEPTIVE - 1, KERNELS, STRIDES) == 0


@pytest.mark.parametrize("norm_type", ["group", "layer"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "frames,tile",
    [(1, 1), (7, 7), (8, 7), (7, 3), (23, 4), (5, 64)],
    ids=["minimum", "exactly-one-tile", "one-frame-more", "partial-last", "many-tiles", "tile-larger"],
)
def test_tiled_equals_untiled(norm_type, bias, frames, tile):
    weights, biases, gammas, betas = _params(norm_type, bias)
    samples = RECEPTIVE + (frames - 1) * PER_FRAME
    for extra in (0, PER_FRAME - 1):  # samples that do not complete another frame are ignored by both
        x = torch.randn(2, samples + extra, dtype=torch.float64)
        args = (x, weights, biases, gammas, betas, STRIDES, norm_type, "gelu", CONV_NORM_EPS)
        ref = ops.feature_extractor_ref(*args)
        out = tiling.tiled_feature_extractor(*args, tile_frames=tile)
        assert out.shape == ref.shape == (2, 6, frames)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_tiled_in_fp32_stays_within_float_tolerance_for_long_inputs():
    weights, biases, gammas, betas = (
        [t if t is None else t.float() for t in seq] for seq in _params("group", True)
    )
    x = torch.randn(1, RECEPTIVE + 4000 * PER_FRAME) + 3.0  # an offset stresses the variance merge
    args = (x, weights, biases, gammas, betas, STRIDES, "group", "gelu", CONV_NORM_EPS)
    ref64 = ops.feature_extractor_ref(x.double(), [w.double() for w in weights], [b.double() for b in biases],
                                      [g if g is None else g.double() for g in gammas],
                                      [b if b is None else b.double() for b in betas], STRIDES, "group")
    err_untiled = (ops.feature_extractor_ref(*args).double() - ref64).abs().max()
    err_tiled = (tiling.tiled_feature_extractor(*args, tile_frames=97).double() - ref64).abs().max()
    assert err_tiled <= 2 * err_untiled + 1e-6, (err_tiled, err_untiled)


def test_bad_arguments_are_named():
    weights, biases, gammas, betas = _params("layer", False)
    x = torch.randn(1, 500, dtype=torch.float64)
    with pytest.raises(ValueError, match="tile_frames"):
        tiling.tiled_feature_extractor(x, weights, biases, gammas, betas, STRIDES, "layer", tile_frames=0)
    with pytest.raises(ValueError, match="receptive field"):
        tiling.tiled_feature_extractor(x[:, :10], weights, biases, gammas, betas, STRIDES, "layer")


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_models_tile_long_inputs_by_themselves_and_match(norm, monkeypatch):
    config = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat", feat_extract_norm=norm,
                                                        do_stable_layer_norm=norm == "layer"))
    model = uf.UniSpeechSatModel(config).eval()
    x, mask = padded_batch([9000, 7000])
    with torch.no_grad():
        ref = model(x, attention_mask=mask).last_hidden_state
        calls = []
        real = tiling.tiled_feature_extractor
        monkeypatch.setattr(tiling, "tiled_feature_extractor", lambda *a, **k: calls.append(k) or real(*a, **k))
        encoder = model.feature_extractor
        encoder.tile_threshold_bytes, encoder.tile_frames = 0, 5
        out = model(x, attention_mask=mask).last_hidden_state
    assert calls and calls[0]["tile_frames"] == 5
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Under autograd the untiled path runs (the tiled one would save nothing there).
    calls.clear()
    model(x, attention_mask=mask)
    assert not calls


@pytest.mark.parametrize("family,head", ALL_CLASSES, ids=[f + h for f, h in ALL_CLASSES])
def test_tiling_settings_are_where_the_readme_says(family, head, monkeypatch):
    """README "Long audio": the settings live on ``model.feature_extractor`` of the two base classes,
    ``model.unispeech[_sat].feature_extractor`` of the heads and ``model.base_model.feature_extractor`` of all ten,
    and setting them there makes the model's own forward tile."""
    from unispeech_fast.modules import FeatureEncoder

    config = getattr(uf, family + "Config")(**tiny_config_kwargs(family))
    model = getattr(uf, family + head)(config).eval()
    prefix = "unispeech_sat" if family == "UniSpeechSat" else "unispeech"
    encoder = model.feature_extractor if head == "Model" else getattr(model, prefix).feature_extractor
    assert type(encoder) is FeatureEncoder and model.base_model.feature_extractor is encoder
    assert (encoder.tile_threshold_bytes, encoder.tile_frames) == (None, None)
    calls = []
    real = tiling.tiled_feature_extractor
    monkeypatch.setattr(tiling, "tiled_feature_extractor", lambda *a, **k: calls.append(k) or real(*a, **k))
    encoder.tile_threshold_bytes, encoder.tile_frames = 0, 5
    with torch.no_grad():
        model(torch.randn(1, 4000))
    assert calls and calls[0]["tile_frames"] == 5


def test_device_defaults_decide_when_inference_is_tiled():
    from unispeech_fast.modules import TILING_DEFAULTS

    config = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat"))
    encoder = uf.UniSpeechSatModel(config).eval().feature_extractor
    threshold, frames = TILING_DEFAULTS["cpu"]
    conv0 = encoder.conv_layers[0].conv
    frames0 = threshold // (conv0.out_channels * 4)  # layer-0 frames at exactly the threshold (fp32)
    samples = (frames0 - 1) * conv0.stride[0] + conv0.kernel_size[0]
    at = torch.empty(1, samples)
    over = torch.empty(1, samples + conv0.stride[0] * 2)
    with torch.no_grad():
        assert encoder._tile_frames_for(at) is None
        assert encoder._tile_frames_for(over) == frames
        encoder.tile_threshold_bytes, encoder.tile_frames = 0, 7  # explicit settings win over the defaults
        assert encoder._tile_frames_for(at) == 7
    assert encoder._tile_frames_for(at) is None  # autograd (parameters require grad): never tiled
