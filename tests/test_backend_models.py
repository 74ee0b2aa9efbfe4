"""Whole models on a kernel backend equal the same models on the eager backend.

Every op of the model runs on the forced backend (``backend("triton")`` on CPU tensors runs Triton's
interpreter, so the configs are tiny). Eval forwards on padded batches with a head mask, and a
deterministic training step (dropout, LayerDrop and SpecAugment off) compared loss and gradients. Under
``backend("cpp")`` the training step runs with a frozen backbone; with trainable dense layers it is refused
(the oneDNN linear has no backward).
"""

from __future__ import annotations

import copy

import pytest
import torch

import unispeech_fast as uf
from conftest import padded_batch, tiny_config_kwargs

NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                     layerdrop=0.0, mask_time_prob=0.0, final_dropout=0.0)
CASES = [
    ("UniSpeechSat", "ForCTC", dict(feat_extract_norm="group", do_stable_layer_norm=False)),
    ("UniSpeechSat", "ForCTC", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    ("UniSpeech", "ForPreTraining", dict(feat_extract_norm="group")),
]
LENGTHS = [1400, 1100]


def _model(family: str, head: str, **overrides):
    config = getattr(uf, family + "Config")(**tiny_config_kwargs(family, **NO_RANDOMNESS, **overrides))
    return getattr(uf, family + head)(config)


def _backends() -> list[str]:
    return ["triton"]


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("family,head,overrides", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_eval_forward_matches_eager(name, family, head, overrides):
    model = _model(family, head, **overrides).eval()
    x, mask = padded_batch(LENGTHS)
    head_mask = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    kwargs = dict(attention_mask=mask, head_mask=head_mask, output_hidden_states=True)
    with torch.no_grad():
        with uf.backend("eager"):
            ref = model(x, **kwargs)
        with uf.backend(name):
            out = model(x, **kwargs)
    for key in ("logits", "projected_states", "projected_quantized_states", "codevector_perplexity"):
        if key in ref:
            torch.testing.assert_close(out[key], ref[key], atol=2e-4, rtol=2e-4, msg=key)
    for i, (o, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        torch.testing.assert_close(o, r, atol=2e-4, rtol=2e-4, msg=f"hidden_states[{i}]")


# (backend, freeze the backbone): under cpp only a frozen backbone trains (README, "Training under backend('cpp')").
TRAINING_CASES = [(name, False) for name in _backends()] + [("cpp", True)]


@pytest.mark.parametrize("name,frozen_backbone", TRAINING_CASES,
                         ids=[n + ("-frozen_backbone" if f else "") for n, f in TRAINING_CASES])
def test_training_step_matches_eager(name, frozen_backbone):
    family, head, overrides = CASES[0]
    model = _model(family, head, **overrides).train()
    if frozen_backbone:
        model.freeze_base_model()
    twin = copy.deepcopy(model)
    x, mask = padded_batch(LENGTHS)
    labels = torch.tensor([[3, 4, 5, 6], [7, 8, -100, -100]])
    with uf.backend("eager"):
        ref = model(x, attention_mask=mask, labels=labels)
    ref.loss.backward()
    with uf.backend(name):
        out = twin(x, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=1e-4)
    trained = [n for n, p in twin.named_parameters() if p.grad is not None]
    assert trained and not (frozen_backbone and any(n.startswith("unispeech_sat.") for n in trained))
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.grad is None:
            assert q.grad is None, n
            continue
        torch.testing.assert_close(q.grad, p.grad, atol=5e-4, rtol=5e-3, msg=n)


@pytest.mark.parametrize("trainable", ["all", "layer_norms_only"])
def test_cpp_training_step_with_dense_gradients_names_linear(trainable):
    """README ("Training under backend('cpp')"): the oneDNN linear has no backward, so a step in which a
    backbone dense layer needs a gradient (its weight, or its input through a trainable LayerNorm before it)
    raises naming the op and the reason; it never runs F.linear in its place."""
    family, head, overrides = CASES[0]
    model = _model(family, head, **overrides).train()
    for n, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or "layer_norm" in n)
    x, mask = padded_batch(LENGTHS)
    labels = torch.tensor([[3, 4, 5, 6], [7, 8, -100, -100]])
    with uf.backend("cpp"), pytest.raises(
        uf.BackendNotSupportedError, match=r"(?s)backend 'cpp' cannot run 'linear'.*the oneDNN linear has no backward"
    ):
        model(x, attention_mask=mask, labels=labels)
    with uf.backend("auto"):  # auto (and eager) train the same model
        model(x, attention_mask=mask, labels=labels).loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if n.startswith("unispeech_sat."))


@pytest.mark.parametrize("name", ["auto"] + _backends())
def test_torch_compile_fullgraph_of_a_model_matches_eager(name):
    """The kernels are torch.library ops with fake implementations, so a whole model compiles in one graph."""
    family, head, overrides = CASES[0]
    model = _model(family, head, **overrides).eval()
    x, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        with uf.backend("eager"):
            ref = model(x, attention_mask=mask).logits
        with uf.backend(name):
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            out = compiled(x, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
