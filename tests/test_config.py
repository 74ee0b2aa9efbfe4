"""Configs: transformers' defaults, config.json round trips with transformers, validation messages,
corrupt config.json files, and the receptive-field / output-length helpers."""

from __future__ import annotations

import json
import os
import re

import pytest
import transformers

import unispeech_fast as uf
from conftest import hf_model, tiny_config_kwargs

FAMILIES = ["UniSpeech", "UniSpeechSat"]

# Generic PreTrainedConfig keys that transformers' ``to_dict()`` always carries and that our configs
# neither store nor write: they have no meaning for these models (and transformers' own config.json
# leaves them out at their defaults, see ``test_to_dict_equals_transformers_diff_dict``).
HF_ONLY_GENERIC_KEYS = {"_name_or_path", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type"}
# Generic keys that we store as attributes but, like transformers' config.json, leave out of
# ``to_dict()`` while they hold their default value.
DEFAULT_ELIDED_GENERIC_KEYS = {
    "architectures", "dtype", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
}


def _ours(family):
    return getattr(uf, family + "Config")


def _theirs(family):
    return getattr(transformers, family + "Config")


def _norm(value):
    """Tuples and lists compare equal; dict keys compare as strings (JSON semantics)."""
    if isinstance(value, (tuple, list)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _norm(v) for k, v in value.items()}
    return value


def _without_version(d):
    return {k: _norm(v) for k, v in d.items() if k != "transformers_version"}


# ------------------------------------------------------------------------------------------ defaults
@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_equal_transformers(family):
    theirs = _without_version(_theirs(family)().to_dict())
    ours_cfg = _ours(family)()
    ours = _without_version(ours_cfg.to_dict())

    # We write nothing that transformers does not.
    assert set(ours) - set(theirs) == set()
    # What transformers has and we do not write is exactly the generic keys listed above.
    assert set(theirs) - set(ours) == HF_ONLY_GENERIC_KEYS | DEFAULT_ELIDED_GENERIC_KEYS
    # Every field both write is equal.
    mismatched = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    assert mismatched == {}
    # The generic keys we store but elide at their default hold transformers' default value.
    for key in sorted(DEFAULT_ELIDED_GENERIC_KEYS):
        assert _norm(getattr(ours_cfg, key)) == theirs[key], key
    assert ours_cfg.num_labels == _theirs(family)().num_labels == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_to_dict_equals_transformers_diff_dict(family):
    """Our to_dict() is what transformers writes into config.json for a default config."""
    assert _without_version(_ours(family)().to_dict()) == _without_version(_theirs(family)().to_diff_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_tuple_fields_accept_lists(family):
    ours = _ours(family)(conv_dim=[32, 32], conv_stride=[4, 4], conv_kernel=[8, 8])
    assert ours.conv_dim == (32, 32) and ours.num_feat_extract_layers == 2
    assert ours.to_dict()["conv_dim"] == [32, 32]


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_round_trip_with_transformers(tmp_path, family):
    id2label = {i: f"speaker_{i}" for i in range(5)}
    theirs = _theirs(family)(
        **tiny_config_kwargs(family, num_labels=5),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        foo_bar=3,
    )
    theirs.save_pretrained(tmp_path / "hf")

    ours = _ours(family).from_pretrained(tmp_path / "hf")
    assert ours.foo_bar == 3
    assert ours.id2label == id2label  # int keys, as transformers holds them
    assert all(isinstance(k, int) for k in ours.id2label)
    assert ours.label2id == {v: k for k, v in id2label.items()}
    assert ours.num_labels == 5
    assert ours.hidden_size == 16 and ours.conv_dim == (32, 32, 32)

    ours.save_pretrained(tmp_path / "ours")
    back = _theirs(family).from_pretrained(tmp_path / "ours")
    assert back.foo_bar == 3 and back.num_labels == 5 and back.id2label == id2label
    assert _without_version(back.to_dict()) == _without_version(theirs.to_dict())
    # The files agree key for key as well.
    with open(tmp_path / "hf" / "config.json") as f:
        hf_json = json.load(f)
    with open(tmp_path / "ours" / "config.json") as f:
        our_json = json.load(f)
    assert _without_version(our_json) == _without_version(hf_json)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_checkpoint_config_round_trip(tmp_path, family):
    """A model saved by transformers records architectures and dtype; both survive our round trip."""
    hf_model(family, "ForCTC").save_pretrained(tmp_path / "hf")
    ours = _ours(family).from_pretrained(tmp_path / "hf")
    assert ours.architectures == [family + "ForCTC"]
    ours.save_pretrained(tmp_path / "ours")
    with open(tmp_path / "hf" / "config.json") as f:
        hf_json = json.load(f)
    with open(tmp_path / "ours" / "config.json") as f:
        our_json = json.load(f)
    assert _without_version(our_json) == _without_version(hf_json)


def test_model_type_mismatch_names_the_file(tmp_path):
    _theirs("UniSpeechSat")(**tiny_config_kwargs("UniSpeechSat")).save_pretrained(tmp_path)
    file = str(tmp_path / "config.json")
    with pytest.raises(uf.ConfigError, match="model_type") as excinfo:
        uf.UniSpeechConfig.from_pretrained(tmp_path)
    assert file in str(excinfo.value)
    assert "unispeech-sat" in str(excinfo.value)
    with pytest.raises(uf.ConfigError) as excinfo:
        uf.UniSpeechModel.from_pretrained(tmp_path)
    assert file in str(excinfo.value)


def test_config_error_is_a_value_error():
    assert issubclass(uf.ConfigError, ValueError)


# ------------------------------------------------------------------------------------------ validation
_INVALID = [
    # (overrides, regex the message must match)
    (dict(conv_dim=(32, 32), conv_stride=(4, 4, 4), conv_kernel=(8, 8, 8)), r"conv_dim.*conv_stride.*conv_kernel"),
    (dict(conv_kernel=(8, 8)), r"len\(conv_kernel\)"),
    (dict(hidden_size=18, num_attention_heads=4), r"hidden_size \(18\).*num_attention_heads \(4\)"),
    (dict(hidden_size=16, num_conv_pos_embedding_groups=3), r"hidden_size \(16\).*num_conv_pos_embedding_groups \(3\)"),
    (dict(codevector_dim=25, num_codevector_groups=2), r"codevector_dim \(25\).*num_codevector_groups \(2\)"),
    (dict(feat_extract_norm="batch"), r"feat_extract_norm.*'batch'"),
    (dict(hidden_act="not_an_activation"), r"hidden_act.*not_an_activation"),
    (dict(feat_extract_activation="mish2"), r"feat_extract_activation.*mish2"),
    (dict(hidden_act="selu"), r"hidden_act.*'selu'"),  # not in transformers' ACT2FN: it could not load it
    (dict(hidden_dropout=-0.1), r"hidden_dropout.*\[0, 1\].*-0\.1"),
    (dict(attention_dropout=1.5), r"attention_dropout.*\[0, 1\]"),
    (dict(mask_time_prob=1.01), r"mask_time_prob.*\[0, 1\]"),
    (dict(layerdrop=-1), r"layerdrop"),
    (dict(hidden_size=0), r"hidden_size.*positive"),
    (dict(num_hidden_layers=-1), r"num_hidden_layers.*positive"),
    (dict(num_attention_heads=0), r"num_attention_heads.*positive"),
    (dict(intermediate_size=0), r"intermediate_size.*positive"),
    (dict(vocab_size=0), r"vocab_size.*positive"),
    (dict(conv_dim=(32, 0, 32)), r"conv_dim.*positive"),
    (dict(conv_stride=(4, -4, 4)), r"conv_stride.*positive"),
    (dict(num_labels=0), r"num_labels.*positive"),
    (dict(layer_norm_eps=0.0), r"layer_norm_eps"),
    (dict(ctc_loss_reduction="avg"), r"ctc_loss_reduction"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("overrides,pattern", _INVALID, ids=[re.sub(r"\W+", "_", str(o)) for o, _ in _INVALID])
def test_invalid_config_raises_value_error_naming_field(family, overrides, pattern):
    with pytest.raises(ValueError, match=pattern) as excinfo:
        _ours(family)(**tiny_config_kwargs(family, **overrides))
    assert isinstance(excinfo.value, uf.ConfigError)


def test_supported_activations_are_transformers_act2fn_names_we_implement():
    """Every accepted activation is a name of transformers' ACT2FN (so transformers loads what we save) and
    computes what transformers' does; every activation we implement is accepted."""
    import torch
    from transformers.activations import ACT2FN

    from unispeech_fast.activations import _ACTIVATIONS, get_activation
    from unispeech_fast.configuration import SUPPORTED_ACTIVATIONS

    assert set(SUPPORTED_ACTIVATIONS) == {name for name in _ACTIVATIONS if name in ACT2FN} == set(_ACTIVATIONS)
    x = torch.linspace(-6, 6, 97, dtype=torch.float64)
    for name in SUPPORTED_ACTIVATIONS:
        torch.testing.assert_close(get_activation(name)(x), ACT2FN[name](x), atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(tdnn_dim=(32, 32, 32)), r"tdnn_dim.*tdnn_kernel.*tdnn_dilation"),
        (dict(tdnn_dilation=(1,)), r"tdnn_dilation"),
        (dict(tdnn_kernel=(3, 0)), r"tdnn_kernel.*positive"),
        (dict(xvector_output_dim=0), r"xvector_output_dim.*positive"),
        (dict(num_clusters=-2), r"num_clusters.*positive"),
    ],
)
def test_invalid_sat_fields(overrides, pattern):
    with pytest.raises(uf.ConfigError, match=pattern):
        uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat", **overrides))


@pytest.mark.parametrize(
    "overrides,pattern",
    [(dict(num_ctc_classes=0), r"num_ctc_classes.*positive"), (dict(replace_prob=1.5), r"replace_prob.*\[0, 1\]")],
)
def test_invalid_unispeech_fields(overrides, pattern):
    with pytest.raises(uf.ConfigError, match=pattern):
        uf.UniSpeechConfig(**tiny_config_kwargs("UniSpeech", **overrides))


def test_num_labels_must_match_id2label():
    with pytest.raises(uf.ConfigError, match=r"num_labels=3.*id2label"):
        uf.UniSpeechSatConfig(num_labels=3, id2label={0: "a", 1: "b"})


def test_invalid_override_in_from_pretrained_is_rejected(tmp_path):
    uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat")).save_pretrained(tmp_path)
    with pytest.raises(uf.ConfigError, match="num_attention_heads"):
        uf.UniSpeechSatConfig.from_pretrained(tmp_path, num_attention_heads=3)


@pytest.mark.parametrize("id2label", [["a", "b"], {"x": "a", "y": "b"}, "a,b"], ids=["list", "non_int_keys", "string"])
def test_malformed_id2label_is_a_config_error(id2label):
    with pytest.raises(uf.ConfigError, match="id2label"):
        uf.UniSpeechSatConfig(id2label=id2label)


def test_malformed_id2label_in_config_json_names_file(tmp_path):
    data = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat")).to_dict()
    data["id2label"] = ["a", "b", "c"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(uf.ConfigError, match="id2label") as excinfo:
        uf.UniSpeechSatConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(excinfo.value)


def test_invalid_config_json_value_names_file_and_field(tmp_path):
    data = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat")).to_dict()
    data["feat_extract_norm"] = "batch"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(uf.ConfigError, match="feat_extract_norm") as excinfo:
        uf.UniSpeechSatConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(excinfo.value)


# ------------------------------------------------------------------------------------------ corrupt files
_CORRUPT = {
    "invalid_json": '{"model_type": "unispeech-sat", "hidden_size": 16,, }',
    "truncated_json": '{"model_type": "unispeech-sat", "hidden_size": 1',
    "json_list": '[{"model_type": "unispeech-sat"}]',
    "json_string": '"unispeech-sat"',
    "empty": "",
    "not_utf8": b"\xff\xfe\xfa\x00garbage",
}


def _write_corrupt(tmp_path, kind):
    content = _CORRUPT[kind]
    file = tmp_path / "config.json"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        file.write_text(content)
    return str(file)


@pytest.mark.parametrize("kind", sorted(_CORRUPT))
def test_corrupt_config_json_from_config_class(tmp_path, kind):
    file = _write_corrupt(tmp_path, kind)
    with pytest.raises(uf.ConfigError) as excinfo:
        uf.UniSpeechSatConfig.from_pretrained(tmp_path)
    assert file in str(excinfo.value)
    # Pointing at the file itself works the same way.
    with pytest.raises(uf.ConfigError) as excinfo:
        uf.UniSpeechSatConfig.from_pretrained(file)
    assert file in str(excinfo.value)


@pytest.mark.parametrize("kind", sorted(_CORRUPT))
@pytest.mark.parametrize("cls_name", ["UniSpeechSatModel", "UniSpeechSatForCTC", "UniSpeechForSequenceClassification"])
def test_corrupt_config_json_from_model_class(tmp_path, kind, cls_name):
    file = _write_corrupt(tmp_path, kind)
    with pytest.raises(uf.ConfigError) as excinfo:
        getattr(uf, cls_name).from_pretrained(tmp_path)
    assert file in str(excinfo.value)


def test_json_list_message_says_what_was_expected(tmp_path):
    _write_corrupt(tmp_path, "json_list")
    with pytest.raises(uf.ConfigError, match=r"JSON object.*list"):
        uf.UniSpeechConfig.from_pretrained(tmp_path)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        uf.UniSpeechConfig.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ lengths
@pytest.mark.parametrize("family", FAMILIES)
def test_receptive_field_default(family):
    config = _ours(family)()
    assert config.receptive_field() == 400
    assert config.inputs_to_logits_ratio == 320
    assert config.output_length(400) == 1
    assert config.output_length(399) == 0


@pytest.mark.parametrize("length", [400, 401, 719, 720, 721, 1040, 16000, 16399, 16400, 48123])
def test_output_length_matches_transformers_formula(length):
    config = uf.UniSpeechSatConfig()
    assert config.output_length(length) == (length - 400) // 320 + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config_lengths_match_transformers_model(family):
    import torch

    theirs = hf_model(family, "Model")
    config = _ours(family)(**tiny_config_kwargs(family))
    rf = config.receptive_field()
    assert rf == 148  # kernel 8 / stride 4, three layers: ((8 - 1) * 4 + 8 - 1) * 4 + 8
    assert config.output_length(rf) == 1 and config.output_length(rf - 1) == 0
    for length in (rf, rf + 63, rf + 64, 1000, 4321):
        expected = int(theirs._get_feat_extract_output_lengths(torch.tensor([length]))[0])
        assert config.output_length(length) == expected, length
