"""head_mask (our extension; transformers 5 dropped it): an entry multiplies that head's attention
probabilities. Oracle: zeroing (scaling) a head equals zeroing (scaling) that head's input columns
of ``out_proj`` in transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

import unispeech_fast as uf
from conftest import hf_model, padded_batch


def _pair(tmp_path, family="UniSpeechSat", head="Model", **overrides):
    theirs = hf_model(family, head, num_attention_heads=4, **overrides)
    theirs.save_pretrained(tmp_path)
    ours = getattr(uf, family + head).from_pretrained(tmp_path)
    return ours, theirs


def _scale_out_proj_columns(model, layer_scales):
    """layer_scales: [num_layers, num_heads]; scale out_proj input columns head by head."""
    base = model.base_model if hasattr(model, "base_model") else model
    for layer, scales in zip(base.encoder.layers, layer_scales):
        w = layer.attention.out_proj.weight
        hd = w.shape[1] // scales.numel()
        with torch.no_grad():
            for h, s in enumerate(scales.tolist()):
                w[:, h * hd:(h + 1) * hd] *= s


@pytest.mark.parametrize("stable", [False, True])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_head_mask_equals_out_proj_columns(tmp_path, stable, per_layer, need_weights):
    ours, theirs = _pair(tmp_path, do_stable_layer_norm=stable)
    if per_layer:
        head_mask = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 2.0, 1.0, 1.0]])
    else:
        head_mask = torch.tensor([1.0, 0.0, 0.25, 1.0])
    full = head_mask if per_layer else head_mask[None].expand(2, 4)
    _scale_out_proj_columns(theirs, full)
    x, mask = padded_batch([2600, 1800])
    with torch.no_grad():
        expected = theirs(x, attention_mask=mask).last_hidden_state
        got = ours(x, attention_mask=mask, head_mask=head_mask, output_attentions=need_weights)
    torch.testing.assert_close(got.last_hidden_state, expected, atol=1e-5, rtol=0)
    if need_weights:
        # returned probabilities carry the mask: a removed head has all-zero weights, the others do not
        for layer, scales in enumerate(full):
            for h, s in enumerate(scales.tolist()):
                weights = got.attentions[layer][:, h]
                assert (torch.count_nonzero(weights) == 0) == (s == 0.0), (layer, h)


def test_all_ones_head_mask_is_identity(tmp_path):
    ours, _ = _pair(tmp_path)
    x = torch.randn(2, 2000)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, head_mask=torch.ones(4)).last_hidden_state, ours(x).last_hidden_state,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", ["ForCTC", "ForSequenceClassification", "ForPreTraining"])
@pytest.mark.parametrize("family", ["UniSpeech", "UniSpeechSat"])
def test_head_mask_reaches_every_head_class(tmp_path, family, head):
    ours, theirs = _pair(tmp_path, family=family, head=head)
    head_mask = torch.tensor([0.0, 1.0, 1.0, 0.5])
    _scale_out_proj_columns(theirs, head_mask[None].expand(2, 4))
    x = torch.randn(2, 2000)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = theirs(x)
        torch.manual_seed(0)
        got = ours(x, head_mask=head_mask)
    key = "projected_states" if head == "ForPreTraining" else "logits"
    torch.testing.assert_close(getattr(got, key), expected[key], atol=1e-5, rtol=0)


def test_head_mask_gradient_flows(tmp_path):
    ours, _ = _pair(tmp_path)
    head_mask = torch.tensor([1.0, 0.5, 1.0, 1.0], requires_grad=True)
    ours(torch.randn(1, 2000), head_mask=head_mask).last_hidden_state.sum().backward()
    assert head_mask.grad is not None and torch.isfinite(head_mask.grad).all()
