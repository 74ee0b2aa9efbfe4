"""patch()/unpatch() of transformers instances: same outputs, losses and gradients, instance-only."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import unispeech_fast as uf
from conftest import ALL_CLASSES, hf_model, padded_batch

NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                     layerdrop=0.0, mask_time_prob=0.0, final_dropout=0.0)


def _labels(head: str, model) -> torch.Tensor | None:
    if head == "ForCTC":
        return torch.tensor([[3, 4, 5], [6, 7, -100]])
    if head in ("ForSequenceClassification", "ForXVector"):
        return torch.tensor([1, 2])
    if head == "ForAudioFrameClassification":
        return None  # the frame head's labels are frame-level; covered by the parity tests
    return None


def _outputs(out) -> dict[str, torch.Tensor]:
    keys = ("loss", "logits", "last_hidden_state", "embeddings", "projected_states")
    return {k: out[k] for k in keys if k in out and out[k] is not None}


@pytest.mark.parametrize("family,head", ALL_CLASSES, ids=lambda v: v)
def test_patched_outputs_and_gradients_equal_unpatched(family, head):
    model = hf_model(family, head, **NO_RANDOMNESS)
    x, mask = padded_batch([1200, 900])
    kwargs = dict(attention_mask=mask, output_hidden_states=True)
    labels = _labels(head, model)
    if labels is not None:
        kwargs["labels"] = labels
    original_forward = model.forward
    ref = model(x, **kwargs)
    ref_out = _outputs(ref)
    scalar = sum(v.float().square().mean() for v in ref_out.values())
    scalar.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    assert uf.patch(model) is model and uf.is_patched(model)
    out = model(x, **kwargs)
    got = _outputs(out)
    assert set(got) == set(ref_out)
    for key in ref_out:
        torch.testing.assert_close(got[key], ref_out[key], atol=1e-5, rtol=1e-5, msg=key)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"hidden_states[{i}]")
    sum(v.float().square().mean() for v in got.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        scale = float(ref_grads[n].abs().max())  # summation-order noise scales with the gradient's size
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5 + 1e-4 * scale, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")

    uf.unpatch(model)
    assert not uf.is_patched(model) and model.forward == original_forward
    assert type(model).forward is getattr(transformers, family + head).forward  # the class was never touched


def test_patch_is_per_instance_and_state_dict_is_unchanged():
    a = hf_model("UniSpeechSat", "ForCTC")
    b = copy.deepcopy(a)
    keys = list(a.state_dict())
    uf.patch(a)
    assert list(a.state_dict()) == keys
    assert not uf.is_patched(b)
    x = torch.randn(1, 1000)
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already patched"):
        uf.patch(a)
    uf.unpatch(a)
    with pytest.raises(ValueError, match="not patched"):
        uf.unpatch(a)


def test_training_steps_match_and_mode_is_mirrored():
    """A Trainer-style loop (optimizer on the transformers parameters) gives the same weights."""
    ref = hf_model("UniSpeechSat", "ForCTC", **NO_RANDOMNESS).train()
    twin = uf.patch(copy.deepcopy(ref))
    x, mask = padded_batch([1100, 1000])
    labels = torch.tensor([[3, 4, 5], [6, 7, -100]])
    for model in (ref, twin):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            loss = model(input_values=x, attention_mask=mask, labels=labels)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
    for (n, p), (_, q) in zip(ref.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=n)
    twin.eval()
    twin(x[:1])
    assert not vars(twin)["_unispeech_fast_model"].training


def test_patch_rejects_other_models():
    with pytest.raises(TypeError, match="transformers UniSpeech"):
        uf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="transformers UniSpeech"):
        uf.patch(uf.UniSpeechSatModel(uf.UniSpeechSatConfig(num_hidden_layers=1, hidden_size=16,
                                                                num_attention_heads=2, intermediate_size=8)))
