"""Parity with transformers (the oracle): every class, both conv norms, both encoder variants, conv
bias on/off, padded batches, hidden states, attentions, losses and gradients.

Checkpoints are written by transformers' own ``save_pretrained`` from random tiny configs and loaded
with our ``from_pretrained``; nothing is downloaded.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

import unispeech_fast as uf
from conftest import ALL_CLASSES, hf_model, padded_batch

ATOL = 1e-5  # fp32; eager vs SDPA in transformers itself differ by ~4e-7

VARIANTS = list(itertools.product(["group", "layer"], [False, True], [False, True]))


def _compare(ours, theirs, keys=None, atol=ATOL):
    keys = keys or list(theirs.keys())
    assert keys, "nothing to compare"
    for key in keys:
        a, b = getattr(ours, key), theirs[key]
        if isinstance(b, tuple):
            assert isinstance(a, tuple) and len(a) == len(b), f"{key}: {len(a) if a else a} vs {len(b)} entries"
            assert len(b) > 0, key
            for i, (x, y) in enumerate(zip(a, b)):
                torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m: f"{key}[{i}]: {m}")
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


def _load_pair(tmp_path, family, head, attn_implementation="eager", **overrides):
    theirs = hf_model(family, head, **overrides)
    theirs.save_pretrained(tmp_path)
    theirs = getattr(transformers, family + head).from_pretrained(tmp_path, attn_implementation=attn_implementation)
    ours = getattr(uf, family + head).from_pretrained(tmp_path)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("family,head", ALL_CLASSES)
@pytest.mark.parametrize("norm,stable,bias", VARIANTS)
def test_forward_parity_padded_with_hidden_states_and_attentions(tmp_path, family, head, norm, stable, bias):
    ours, theirs = _load_pair(
        tmp_path, family, head, feat_extract_norm=norm, do_stable_layer_norm=stable, conv_bias=bias,
        use_weighted_layer_sum=stable,
    )
    x, mask = padded_batch([3000, 2000, 1200])
    with torch.no_grad():
        torch.manual_seed(1)
        expected = theirs(x, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        torch.manual_seed(1)
        got = ours(x, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert "hidden_states" in expected and "attentions" in expected
    _compare(got, expected)


@pytest.mark.parametrize("family,head", ALL_CLASSES)
def test_forward_parity_sdpa_default_unpadded(tmp_path, family, head):
    """transformers' default (SDPA) attention against our default path, no mask."""
    ours, theirs = _load_pair(tmp_path, family, head, attn_implementation="sdpa")
    x = torch.randn(2, 2500)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = theirs(x)
        torch.manual_seed(3)
        got = ours(x)
    _compare(got, expected)


@pytest.mark.parametrize("family", ["UniSpeech", "UniSpeechSat"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ctc_loss_and_gradients(tmp_path, family, reduction):
    ours, theirs = _load_pair(tmp_path, family, "ForCTC", ctc_loss_reduction=reduction, do_stable_layer_norm=True,
                              feat_extract_norm="layer")
    x, mask = padded_batch([3000, 2400, 1800])
    labels = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 5, -100, -100], [7, 8, 0, 0, 0]])  # -100 and pad(0) padding
    expected = theirs(x, attention_mask=mask, labels=labels)
    got = ours(x, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    expected.loss.backward()
    got.loss.backward()
    theirs_grads = dict(theirs.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        q = theirs_grads[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            # With reduction="sum" the gradients reach ~50, where fp32 rounding alone (transformers' own
            # error against an fp64 run) is ~2e-4: the absolute tolerance scales with the tensor's size.
            atol = 1e-5 * max(1.0, q.grad.abs().max().item())
            torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("family", ["UniSpeech", "UniSpeechSat"])
def test_sequence_classification_loss(tmp_path, family):
    ours, theirs = _load_pair(tmp_path, family, "ForSequenceClassification")
    x, mask = padded_batch([3000, 2000, 1500])
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = theirs(x, attention_mask=mask, labels=labels)
        got = ours(x, attention_mask=mask, labels=labels)
        unmasked = ours(x, labels=labels)
    _compare(got, expected, ["loss", "logits"])
    assert not torch.allclose(unmasked.loss, got.loss)


def test_audio_frame_classification_loss(tmp_path):
    ours, theirs = _load_pair(tmp_path, "UniSpeechSat", "ForAudioFrameClassification")
    x, mask = padded_batch([3000, 2000])
    frames = ours(x).logits.shape[1]
    labels = torch.nn.functional.one_hot(torch.randint(0, 3, (2, frames)), 3)
    with torch.no_grad():
        expected = theirs(x, attention_mask=mask, labels=labels)
        got = ours(x, attention_mask=mask, labels=labels)
    _compare(got, expected, ["loss", "logits"])


@pytest.mark.parametrize("with_mask", [False, True])
def test_xvector_loss_and_embeddings(tmp_path, with_mask):
    ours, theirs = _load_pair(tmp_path, "UniSpeechSat", "ForXVector")
    x, mask = padded_batch([6000, 4000, 5000])
    labels = torch.tensor([2, 0, 1])
    kwargs = {"attention_mask": mask} if with_mask else {}
    with torch.no_grad():
        expected = theirs(x, labels=labels, **kwargs)
        got = ours(x, labels=labels, **kwargs)
    _compare(got, expected, ["loss", "logits", "embeddings"])


@pytest.mark.parametrize("family", ["UniSpeech", "UniSpeechSat"])
def test_training_step_parity_same_seeds(tmp_path, family):
    """Train mode (dropout, layerdrop, SpecAugment from numpy/torch RNG, Gumbel sampling) draws the same
    random numbers in the same order as transformers, so equal seeds give equal losses and gradients."""
    kw = dict(mask_time_prob=0.3, mask_time_length=2, mask_feature_prob=0.2, mask_feature_length=2,
              layerdrop=0.0, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    ours, theirs = _load_pair(tmp_path, family, "ForCTC", attn_implementation="sdpa", **kw)
    ours.train()
    theirs.train()
    x, mask = padded_batch([3000, 2600])
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    for model in (theirs, ours):
        torch.manual_seed(7)
        import numpy as np

        np.random.seed(7)
        out = model(x, attention_mask=mask, labels=labels)
        out.loss.backward()
        model._loss = out.loss.detach()
    torch.testing.assert_close(ours._loss, theirs._loss, atol=1e-5, rtol=1e-5)
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_unispeech_pretraining_train_mode_gumbel(tmp_path):
    ours, theirs = _load_pair(tmp_path, "UniSpeech", "ForPreTraining", attn_implementation="sdpa",
                              hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                              feat_proj_dropout=0.0, mask_time_prob=0.0, final_dropout=0.1)
    ours.train()
    theirs.train()
    ours.set_gumbel_temperature(0.7)
    theirs.set_gumbel_temperature(0.7)
    x = torch.randn(2, 2500)
    results = []
    for model in (theirs, ours):
        torch.manual_seed(11)
        out = model(x)
        out.projected_quantized_states.sum().backward()
        results.append((out, torch.rand(3)))  # RNG state after the forward must match too
    (e, e_next), (g, g_next) = results
    _compare(g, e, ["projected_states", "projected_quantized_states", "codevector_perplexity"])
    torch.testing.assert_close(g_next, e_next, atol=0, rtol=0)
    torch.testing.assert_close(ours.quantizer.codevectors.grad, theirs.quantizer.codevectors.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.quantizer.weight_proj.weight.grad, theirs.quantizer.weight_proj.weight.grad,
                               atol=1e-6, rtol=1e-5)


def test_mask_time_indices_given_in_eval(tmp_path):
    ours, theirs = _load_pair(tmp_path, "UniSpeechSat", "ForCTC")
    x = torch.randn(2, 2500)
    frames = ours(x).logits.shape[1]
    m = torch.zeros(2, frames, dtype=torch.bool)
    m[0, 3:6] = True
    m[1, 10:12] = True
    with torch.no_grad():
        expected = theirs(x, mask_time_indices=m)
        got = ours(x, mask_time_indices=m)
    _compare(got, expected, ["logits"])
    assert not torch.allclose(got.logits, ours(x).logits)


@pytest.mark.parametrize("tie", [False, True])
def test_stable_hidden_states_semantics(tmp_path, tie):
    """transformers 5: hidden_states[-1] of a stable (pre-LN) encoder is before the final LayerNorm,
    unless config.tie_last_hidden_states is set."""
    ours, theirs = _load_pair(tmp_path, "UniSpeech", "Model", do_stable_layer_norm=True, feat_extract_norm="layer",
                              tie_last_hidden_states=tie)
    x = torch.randn(1, 2000)
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True)
        got = ours(x, output_hidden_states=True)
    _compare(got, expected, ["last_hidden_state", "hidden_states"])
    assert torch.equal(got.hidden_states[-1], got.last_hidden_state) == tie


def test_return_dict_false_tuple_order(tmp_path):
    ours, theirs = _load_pair(tmp_path, "UniSpeechSat", "ForXVector")
    x = torch.randn(2, 4000)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        expected = theirs(x, labels=labels, output_hidden_states=True, return_dict=False)
        got = ours(x, labels=labels, output_hidden_states=True, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(expected) == 4
    for a, b in zip(got[:3], expected[:3]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
