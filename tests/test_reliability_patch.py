"""``patch()`` follows the transformers model as it changes, or refuses the change loudly (issue 10 item 1).

Each test changes a patched model and an unpatched twin the same way and compares outputs; a change
that patch() cannot follow must raise :class:`unispeech_fast.PatchedModelChangedError`, never run stale.
"""

from __future__ import annotations

import copy

import pytest
import torch

import unispeech_fast as uf
from conftest import hf_model, padded_batch
from unispeech_fast import PatchedModelChangedError

NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                     layerdrop=0.0, mask_time_prob=0.0, final_dropout=0.0)
BACKENDS = ["eager", "auto"]


def _pair(head: str = "ForCTC", family: str = "UniSpeechSat", **overrides):
    """(patched, unpatched twin) with identical weights."""
    ref = hf_model(family, head, **{**NO_RANDOMNESS, **overrides})
    return uf.patch(copy.deepcopy(ref)), ref


def _out(model, backend="auto", **kwargs):
    x, mask = padded_batch([1200, 900])
    with torch.no_grad(), uf.backend(backend):
        return model(x, attention_mask=mask, **kwargs)


def _assert_same(patched, ref, backend="auto", key="logits", **kwargs):
    torch.testing.assert_close(_out(patched, backend, **kwargs)[key], _out(ref, backend, **kwargs)[key],
                               atol=1e-5, rtol=1e-5)


Q = "unispeech_sat.encoder.layers.0.attention.q_proj"
G = "unispeech_sat.encoder.pos_conv_embed.conv.parametrizations.weight.original0"


def _change(model, how: str) -> None:
    torch.manual_seed(7)  # the same change on both models
    if how == "data_write":
        model.get_parameter(Q + ".weight").data.mul_(-2.0)
        model.get_parameter(G).data.mul_(0.5)
    elif how == "load_state_dict_assign":
        state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
    elif how == "new_parameter":
        q = model.get_submodule(Q)
        q.weight = torch.nn.Parameter(torch.randn_like(q.weight) * 0.1)
        model.unispeech_sat.masked_spec_embed = torch.nn.Parameter(torch.randn(model.config.hidden_size))
        model.lm_head.bias = torch.nn.Parameter(torch.randn_like(model.lm_head.bias))
    elif how == "swapped_linear":  # a LoRA-like wrapper around the original layer
        model.get_submodule(Q.rpartition(".")[0]).q_proj = _LoRA(model.get_submodule(Q))
    elif how == "swapped_layer_norm":
        enc = model.unispeech_sat.encoder
        enc.layer_norm = torch.nn.LayerNorm(model.config.hidden_size, eps=1e-3)
        torch.nn.init.normal_(enc.layer_norm.weight)
    elif how == "forward_hook":
        model.get_submodule(Q).register_forward_hook(lambda m, args, out: out * 3.0)
    elif how == "forward_pre_hook":
        model.lm_head.register_forward_pre_hook(lambda m, args: (args[0] + 1.0,))
    elif how == "to_float64":
        model.to(torch.float64)
    elif how == "to_float64_new_tensors":
        old = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)  # .to() makes new Parameters
        try:
            model.to(torch.float64)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(old)
    elif how == "config_edit":
        model.config.ctc_loss_reduction = "mean" if model.config.ctc_loss_reduction == "sum" else "sum"
    else:
        raise AssertionError(how)


class _LoRA(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class _Wrapper(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


FOLLOWED = ["data_write", "load_state_dict_assign", "new_parameter", "swapped_linear", "swapped_layer_norm",
            "forward_hook", "forward_pre_hook", "to_float64", "to_float64_new_tensors"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", FOLLOWED)
def test_patched_model_follows_the_change(how, backend):
    patched, ref = _pair()
    _out(patched, backend)  # run once before the change: nothing from this call may survive it
    before = _out(patched, backend).logits
    _change(patched, how)
    _change(ref, how)
    x_dtype = torch.float64 if how.startswith("to_float64") else torch.float32
    x, mask = padded_batch([1200, 900])
    with torch.no_grad(), uf.backend(backend):
        got = patched(x.to(x_dtype), attention_mask=mask).logits
        want = ref(x.to(x_dtype), attention_mask=mask).logits
    assert not torch.equal(got.to(before.dtype), before) or how.startswith("to_float64")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_config_edit_is_followed():
    patched, ref = _pair()
    x, mask = padded_batch([1200, 900])
    labels = torch.tensor([[3, 4, 5], [6, 7, -100]])
    _change(patched, "config_edit")
    _change(ref, "config_edit")
    with torch.no_grad():
        torch.testing.assert_close(patched(x, attention_mask=mask, labels=labels)["loss"],
                                   ref(x, attention_mask=mask, labels=labels).loss, atol=1e-5, rtol=1e-5)


def test_hooks_registered_after_patch_fire_with_the_same_arguments():
    patched, ref = _pair()
    seen = {"patched": [], "ref": []}
    for model, key in ((patched, "patched"), (ref, "ref")):
        for name in ("q_proj", "out_proj"):
            layer = model.unispeech_sat.encoder.layers[1].attention.get_submodule(name)
            layer.register_forward_hook(lambda m, a, o, k=key, n=name: seen[k].append((n, o.detach().clone())))
    _out(patched)
    _out(ref)
    assert [n for n, _ in seen["patched"]] == [n for n, _ in seen["ref"]] == ["q_proj", "out_proj"]
    for (_, a), (_, b) in zip(seen["patched"], seen["ref"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_hooks_and_gradients_follow_a_swapped_layer():
    patched, ref = _pair()
    fired = []
    for model in (patched, ref):
        model.get_submodule(Q.rpartition(".")[0]).q_proj = _LoRA(copy.deepcopy(model.get_submodule(Q)))
        model.lm_head.register_full_backward_hook(lambda m, gi, go: fired.append(m))
    x, mask = padded_batch([1200, 900])
    grads = []
    for model in (patched, ref):
        model.zero_grad()
        model(x, attention_mask=mask).logits.square().mean().backward()
        grads.append(model.get_submodule(Q).up.weight.grad.clone())
    assert len(fired) == 2
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_train_and_eval_of_submodules_are_mirrored():
    patched, _ = _pair(attention_dropout=0.5)
    ours = vars(patched)["_unispeech_fast_model"]
    patched.train()
    _out(patched)
    assert ours.training and ours.unispeech_sat.encoder.layers[0].attention.training
    patched.eval()
    patched.unispeech_sat.encoder.layers[0].attention.train()  # MC-dropout style: one submodule in train
    _out(patched)
    assert not ours.training and ours.unispeech_sat.encoder.layers[0].attention.training
    assert not ours.unispeech_sat.encoder.layers[1].attention.training


@pytest.mark.parametrize("what", ["hook_on_encoder_layer", "hook_on_attention", "pre_hook_on_conv_layer",
                                  "hook_on_pos_conv", "wrapped_conv", "wrapped_tdnn_kernel",
                                  "replaced_encoder_layer", "removed_weight_norm"])
def test_changes_patch_cannot_follow_are_refused(what):
    head = "ForXVector" if what == "wrapped_tdnn_kernel" else "ForCTC"
    patched, _ = _pair(head)
    backbone = patched.unispeech_sat
    if what == "hook_on_encoder_layer":  # the common "grab hidden states" pattern: would never fire
        backbone.encoder.layers[1].register_forward_hook(lambda m, a, o: None)
    elif what == "hook_on_attention":
        backbone.encoder.layers[0].attention.register_forward_pre_hook(lambda m, a: None)
    elif what == "pre_hook_on_conv_layer":  # torch.nn.utils.prune works this way
        backbone.feature_extractor.conv_layers[0].conv.register_forward_pre_hook(lambda m, a: None)
    elif what == "hook_on_pos_conv":
        backbone.encoder.pos_conv_embed.conv.register_forward_hook(lambda m, a, o: None)
    elif what == "wrapped_conv":
        layer = backbone.feature_extractor.conv_layers[1]
        layer.conv = torch.nn.Sequential(layer.conv)
    elif what == "wrapped_tdnn_kernel":
        patched.tdnn[0].kernel = _LoRA(patched.tdnn[0].kernel)
    elif what == "replaced_encoder_layer":
        backbone.encoder.layers[0] = _Wrapper(backbone.encoder.layers[0])
    elif what == "removed_weight_norm":
        torch.nn.utils.parametrize.remove_parametrizations(backbone.encoder.pos_conv_embed.conv, "weight")
    with pytest.raises(PatchedModelChangedError, match="unpatch"):
        _out(patched, "auto")
    uf.unpatch(patched)
    if what != "wrapped_tdnn_kernel":  # transformers' TDNN reads the kernel's weight too
        _out(patched)  # transformers' own forward still runs


def test_gradient_checkpointing_and_feature_encoder_freezing_are_mirrored():
    patched, ref = _pair()
    ours = vars(patched)["_unispeech_fast_model"]
    patched.gradient_checkpointing_enable()
    patched.freeze_feature_encoder()
    patched.train()
    x, mask = padded_batch([1200, 900])
    patched(x, attention_mask=mask).logits.square().mean().backward()
    assert ours.unispeech_sat.encoder.gradient_checkpointing
    assert not ours.unispeech_sat.feature_extractor._requires_grad
    assert all(p.grad is None for p in patched.unispeech_sat.feature_extractor.parameters())
    patched.gradient_checkpointing_disable()
    _out(patched)
    assert not ours.unispeech_sat.encoder.gradient_checkpointing
