"""Model behaviour beyond single-forward parity: training utilities, batching, documented quirks."""

from __future__ import annotations

import pytest
import torch

import unispeech_fast as uf
from conftest import padded_batch, tiny_config_kwargs


def _model(cls_name, **overrides):
    family = "UniSpeechSat" if cls_name.startswith("UniSpeechSat") else "UniSpeech"
    config = getattr(uf, family + "Config")(**tiny_config_kwargs(family, **overrides))
    return getattr(uf, cls_name)(config)


def test_layer_norm_model_batched_equals_per_sample():
    model = _model("UniSpeechSatModel", feat_extract_norm="layer", do_stable_layer_norm=True).eval()
    lengths = [3000, 1700, 1213]
    x, mask = padded_batch(lengths)
    with torch.no_grad():
        batched = model(x, attention_mask=mask).last_hidden_state
        for i, n in enumerate(lengths):
            single = model(x[i:i + 1, :n]).last_hidden_state
            frames = single.shape[1]
            torch.testing.assert_close(batched[i, :frames], single[0], atol=1e-5, rtol=0)


def test_group_norm_padding_changes_valid_frames_like_transformers():
    """Quirk Q6: GroupNorm statistics cover the padded zeros, so batching changes valid frames."""
    model = _model("UniSpeechSatModel", feat_extract_norm="group").eval()
    x, mask = padded_batch([3000, 1500])
    with torch.no_grad():
        batched = model(x, attention_mask=mask).last_hidden_state
        single = model(x[1:, :1500]).last_hidden_state
    assert (batched[1, : single.shape[1]] - single[0]).abs().max() > 1e-3


def test_freeze_feature_encoder_and_base_model():
    model = _model("UniSpeechSatForCTC").train()
    model.freeze_feature_encoder()
    out = model(torch.randn(2, 2000), labels=torch.tensor([[1, 2], [3, 4]]))
    out.loss.backward()
    assert all(p.grad is None for p in model.base_model.feature_extractor.parameters())
    assert model.lm_head.weight.grad is not None
    assert model.base_model.encoder.layers[0].attention.q_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.freeze_base_model()
    model(torch.randn(2, 2000), labels=torch.tensor([[1, 2], [3, 4]])).loss.backward()
    assert all(p.grad is None for p in model.base_model.parameters())
    assert model.lm_head.weight.grad is not None


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = _model("UniSpeechForCTC", layerdrop=0.0, mask_time_prob=0.0).train()
    x = torch.randn(2, 2500)
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]])

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        model(x, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_layerdrop_with_weighted_layer_sum_does_not_crash():
    """transformers 5 raises here (quirk Q1); we record a skipped layer's input as its output."""
    model = _model("UniSpeechSatForSequenceClassification", use_weighted_layer_sum=True, layerdrop=0.9).train()
    x = torch.randn(2, 2000)
    for seed in range(8):
        torch.manual_seed(seed)
        out = model(x, labels=torch.tensor([0, 1]), output_hidden_states=True)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        out.loss.backward()


def test_spec_augment_sampled_in_training_only():
    model = _model("UniSpeechSatModel", mask_time_prob=0.5, mask_time_length=2, hidden_dropout=0.0,
                   attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, feat_proj_dropout=0.0)
    x = torch.randn(1, 3000)
    model.eval()
    with torch.no_grad():
        a, b = model(x).last_hidden_state, model(x).last_hidden_state
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c = model(x).last_hidden_state
    assert not torch.allclose(a, c)
    model.config.apply_spec_augment = False
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, a, atol=1e-6, rtol=0)


def test_gumbel_temperature_changes_sampling_only_in_training():
    model = _model("UniSpeechForPreTraining", mask_time_prob=0.0)
    x = torch.randn(1, 3000)
    model.train()
    model.set_gumbel_temperature(0.5)
    assert model.quantizer.temperature == 0.5
    out = model(x)
    out.projected_quantized_states.sum().backward()
    assert model.quantizer.codevectors.grad is not None
    assert torch.isfinite(out.codevector_perplexity)
    with pytest.raises(ValueError, match="temperature"):
        model.set_gumbel_temperature(0)


def test_return_dict_false_on_base_model():
    model = _model("UniSpeechModel", mask_time_prob=0.0).eval()
    out = model(torch.randn(1, 2000), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2  # last_hidden_state, extract_features
    assert out[1].shape[-1] == model.config.conv_dim[-1]


def test_unispeech_without_masking_has_no_masked_spec_embed():
    model = _model("UniSpeechModel", mask_time_prob=0.0, mask_feature_prob=0.0)
    assert "masked_spec_embed" not in model.state_dict()
    assert "masked_spec_embed" in _model("UniSpeechSatModel", mask_time_prob=0.0).state_dict()
    frames = model(torch.randn(1, 2000)).last_hidden_state.shape[1]
    with pytest.raises(ValueError, match="masked_spec_embed"):
        model(torch.randn(1, 2000), mask_time_indices=torch.ones(1, frames, dtype=torch.bool))


def test_xvector_tdnn_lengths_quirk_and_fix():
    model = _model("UniSpeechSatForXVector")
    lengths = torch.tensor([100])
    assert model._get_tdnn_output_lengths(lengths).item() == 100 - 2 - 2  # dilation ignored (quirk Q2)
    model.config.tdnn_lengths_use_dilation = True
    assert model._get_tdnn_output_lengths(lengths).item() == 100 - 2 - 4


def test_fresh_init_statistics_match_transformers_rules():
    """transformers' test_initialization rule: with a zero initializer_range, every parameter not in
    its list of specially initialised ones has mean exactly 0 or 1."""
    special = ("conv.weight", "conv.parametrizations.weight", "masked_spec_embed", "codevectors",
               "quantizer.weight_proj.weight", "project_hid", "project_q", "feature_projection.projection",
               "label_embeddings_concat", "objective.weight")
    for name in ("UniSpeechForPreTraining", "UniSpeechSatForPreTraining", "UniSpeechSatForXVector"):
        model = _model(name, initializer_range=1e-10)
        for pname, p in model.named_parameters():
            mean = p.detach().mean().item()
            if any(s in pname for s in special):
                assert -1.0 <= mean <= 1.0, (name, pname, mean)
            else:
                assert round(mean, 6) in (0.0, 1.0), (name, pname, mean)


@pytest.mark.parametrize("name", ["ForCTC", "ForSequenceClassification", "ForAudioFrameClassification", "ForXVector"])
def test_each_head_documents_its_labels_in_forward(name):
    """``help(model.forward)`` shows the head's own ``labels`` contract and output, not only the shared text."""
    import inspect

    from unispeech_fast.models import heads

    for family in ("UniSpeech", "UniSpeechSat"):
        cls = getattr(uf, family + name, None)
        if cls is None:
            continue
        doc = inspect.getdoc(cls.forward)
        assert f"{name}: ``labels``" in doc, (cls.__name__, doc)
        assert list(inspect.signature(cls.forward).parameters)[:4] == ["self", "input_values", "attention_mask", "labels"]
    assert getattr(heads, name).forward is not heads._Head.forward
