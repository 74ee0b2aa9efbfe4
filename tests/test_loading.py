"""Checkpoint compatibility with transformers: our save_pretrained loads in transformers, all
weight layouts and both weight-norm namings load, backbone <-> head prefix handling."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import unispeech_fast as uf
from conftest import ALL_CLASSES, hf_model, padded_batch, tiny_config_kwargs


def _outputs_equal(a, b, keys):
    for key in keys:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


def _main_key(head):
    return {"Model": "last_hidden_state", "ForPreTraining": "projected_states"}.get(head, "logits")


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_saved_files_get_the_umask_mode(tmp_path, mask):
    """safetensors creates files 0600; ours get ``0o666 & ~umask`` like any other file (review2 item 6)."""
    config = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat"))
    model = uf.UniSpeechSatModel(config)
    old = os.umask(mask)
    try:
        model.save_pretrained(tmp_path / "one")
        model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    finally:
        os.umask(old)
    for directory in ("one", "sharded"):
        names = sorted(os.listdir(tmp_path / directory))
        assert sum(n.endswith(".safetensors") for n in names) >= (1 if directory == "one" else 2), names
        for name in names:
            assert oct(os.stat(tmp_path / directory / name).st_mode & 0o777) == oct(0o666 & ~mask), name


@pytest.mark.parametrize("family,head", ALL_CLASSES)
def test_our_save_loads_in_transformers(tmp_path, family, head):
    config = getattr(uf, family + "Config")(**tiny_config_kwargs(family, do_stable_layer_norm=True))
    ours = getattr(uf, family + head)(config).eval()
    ours.save_pretrained(tmp_path)
    theirs = getattr(transformers, family + head).from_pretrained(tmp_path).eval()
    x, mask = padded_batch([2500, 2000])
    with torch.no_grad():
        torch.manual_seed(0)
        expected = theirs(x, attention_mask=mask)
        torch.manual_seed(0)
        got = ours(x, attention_mask=mask)
    key = _main_key(head)
    torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)
    # and ours reloads its own checkpoint bit-exactly
    again = getattr(uf, family + head).from_pretrained(tmp_path)
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def _legacy_rename(directory):
    file = os.path.join(directory, "model.safetensors")
    state = load_file(file)
    renamed = {k.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    assert any(k.endswith("weight_g") for k in renamed)
    save_file(renamed, file, metadata={"format": "pt"})


def test_legacy_weight_norm_names_load(tmp_path):
    theirs = hf_model("UniSpeechSat", "ForCTC")
    theirs.save_pretrained(tmp_path)
    x = torch.randn(2, 2000)
    with torch.no_grad():
        expected = theirs(x).logits
    _legacy_rename(tmp_path)
    ours = uf.UniSpeechSatForCTC.from_pretrained(tmp_path)
    assert ours.loading_info["missing_keys"] == [] and ours.loading_info["unexpected_keys"] == []
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, expected, atol=1e-6, rtol=0)


def test_pytorch_model_bin_loads(tmp_path):
    theirs = hf_model("UniSpeech", "ForCTC", feat_extract_norm="layer")
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    theirs.config.save_pretrained(tmp_path)
    ours = uf.UniSpeechForCTC.from_pretrained(tmp_path)
    x = torch.randn(1, 2000)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-6, rtol=0)


def test_sharded_safetensors_from_transformers_load(tmp_path):
    theirs = hf_model("UniSpeechSat", "ForSequenceClassification")
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json"), os.listdir(tmp_path)
    ours = uf.UniSpeechSatForSequenceClassification.from_pretrained(tmp_path)
    x = torch.randn(2, 2000)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-6, rtol=0)


def test_our_sharded_save_loads_in_transformers(tmp_path):
    config = uf.UniSpeechConfig(**tiny_config_kwargs("UniSpeech"))
    ours = uf.UniSpeechForCTC(config).eval()
    ours.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    theirs = transformers.UniSpeechForCTC.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 2000)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,head", [c for c in ALL_CLASSES if c[1] != "Model"])
def test_backbone_checkpoint_into_head_and_back(tmp_path, family, head):
    base = hf_model(family, "Model")
    base.save_pretrained(tmp_path / "base")
    ours = getattr(uf, family + head).from_pretrained(tmp_path / "base")
    info = ours.loading_info
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["newly_initialized_keys"], "the head's parameters must be reported as newly initialised"
    assert all(not k.startswith(ours.base_model_prefix + ".") for k in info["newly_initialized_keys"])
    x = torch.randn(1, 2000)
    # The eager backend isolates the loading from kernel rounding (auto may pick the C++ kernels).
    with torch.no_grad(), uf.backend("eager"):
        torch.testing.assert_close(ours.base_model(x).last_hidden_state, base(x).last_hidden_state, atol=1e-6, rtol=0)
    # a head checkpoint into the bare model: head keys are dropped and reported
    full = hf_model(family, head)
    full.save_pretrained(tmp_path / "head")
    bare = getattr(uf, family + "Model").from_pretrained(tmp_path / "head")
    assert bare.loading_info["ignored_keys"] and bare.loading_info["missing_keys"] == []
    with torch.no_grad(), uf.backend("eager"):
        torch.testing.assert_close(bare(x).last_hidden_state, full.base_model(x).last_hidden_state, atol=1e-6, rtol=0)


def test_pretraining_checkpoint_into_ctc_reports_like_transformers(tmp_path):
    hf_model("UniSpeech", "ForPreTraining").save_pretrained(tmp_path)
    ours = uf.UniSpeechForCTC.from_pretrained(tmp_path)
    ignored = ours.loading_info["ignored_keys"]
    for prefix in ("quantizer.", "project_q.", "project_hid.", "ctc_proj."):
        assert any(k.startswith(prefix) for k in ignored), prefix
    assert ours.loading_info["newly_initialized_keys"] == ["lm_head.bias", "lm_head.weight"]


def test_dtype_and_config_overrides(tmp_path):
    hf_model("UniSpeechSat", "ForSequenceClassification").save_pretrained(tmp_path)
    ours = uf.UniSpeechSatForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float64, layerdrop=0.0)
    assert ours.dtype == torch.float64 and ours.config.layerdrop == 0.0
    out = ours(torch.randn(1, 2000, dtype=torch.float64))
    assert out.logits.dtype == torch.float64
    half = uf.UniSpeechSatForSequenceClassification.from_pretrained(tmp_path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert uf.UniSpeechSatForSequenceClassification.from_pretrained(tmp_path).dtype == torch.float32  # "auto"


def test_unknown_hub_id_without_network_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        uf.UniSpeechSatModel.from_pretrained("no-such-org/no-such-model-xyz")
