"""Bad inputs, labels, checkpoints and backend requests raise the documented error type with a message
that names the argument (or file, or key) and says what was expected. Nothing is swallowed."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import unispeech_fast as uf
from conftest import ALL_CLASSES, hf_model, padded_batch, tiny_config_kwargs

RF = 148  # receptive field of the tiny conftest config (kernel 8, stride 4, three conv layers)


def _model(family="UniSpeechSat", head="Model", **overrides):
    config = getattr(uf, family + "Config")(**tiny_config_kwargs(family, **overrides))
    return getattr(uf, family + head)(config).eval()


@pytest.fixture(scope="module")
def sat_model():
    torch.manual_seed(0)
    return _model()


def test_tiny_receptive_field(sat_model):
    assert sat_model.config.receptive_field() == RF


# ------------------------------------------------------------------------------------------ input_values
@pytest.mark.parametrize("shape", [(400,), (1, 1, 400), (2, 1, 400)], ids=["rank1", "rank3", "rank3_b2"])
def test_input_values_wrong_rank(sat_model, shape):
    with pytest.raises(ValueError, match=r"input_values.*\[batch, samples\]"):
        sat_model(torch.randn(*shape))


def test_rank1_message_suggests_batch_dim(sat_model):
    with pytest.raises(ValueError, match=r"input_values\[None\]"):
        sat_model(torch.randn(400))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int64, torch.bool, torch.complex64])
def test_input_values_non_real_float_dtype(sat_model, dtype):
    x = torch.zeros(1, 400, dtype=dtype)
    with pytest.raises(TypeError, match=rf"input_values.*{re.escape(str(dtype))}"):
        sat_model(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_values_dtype_mismatch_says_to_cast(sat_model, dtype):
    with pytest.raises(TypeError, match=r"input_values.*float32.*cast"):
        sat_model(torch.randn(1, 400).to(dtype))


@pytest.mark.parametrize("value", [[[0.0] * 400], None, 3.0], ids=["list", "none", "float"])
def test_input_values_not_a_tensor(sat_model, value):
    with pytest.raises(TypeError, match=r"input_values.*torch\.Tensor"):
        sat_model(value)


def test_input_values_numpy_is_not_accepted(sat_model):
    import numpy as np

    with pytest.raises(TypeError, match="input_values"):
        sat_model(np.zeros((1, 400), dtype=np.float32))


@pytest.mark.parametrize("family,head", ALL_CLASSES)
def test_audio_shorter_than_receptive_field(family, head):
    model = _model(family, head)
    rf = model.config.receptive_field()
    with pytest.raises(ValueError, match=rf"input_values.*\b{rf}\b") as excinfo:
        model(torch.randn(2, rf - 1))
    assert str(rf - 1) in str(excinfo.value)  # the actual length is reported too


@pytest.mark.parametrize("family", ["UniSpeech", "UniSpeechSat"])
def test_exactly_receptive_field_gives_one_frame(family):
    model = _model(family)
    rf = model.config.receptive_field()
    with torch.no_grad():
        out = model(torch.randn(2, rf))
    assert out.last_hidden_state.shape == (2, 1, 16)
    with torch.no_grad():
        out = _model(family, "ForCTC")(torch.randn(1, rf), attention_mask=torch.ones(1, rf, dtype=torch.long))
    assert out.logits.shape == (1, 1, 32)


# ------------------------------------------------------------------------------------------ attention_mask
def test_attention_mask_shape_mismatch(sat_model):
    x, _ = padded_batch([400, 300])
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 400\).*\(2, 300\)"):
        sat_model(x, attention_mask=torch.ones(2, 300, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 400\)"):
        sat_model(x, attention_mask=torch.ones(400, dtype=torch.long))


def test_attention_mask_not_a_tensor(sat_model):
    x, mask = padded_batch([400, 300])
    with pytest.raises(TypeError, match="attention_mask"):
        sat_model(x, attention_mask=mask.tolist())


@pytest.mark.parametrize("bad_value", [2, -1])
def test_attention_mask_values_other_than_0_1(sat_model, bad_value):
    x, mask = padded_batch([400, 300])
    mask[0, 10] = bad_value
    with pytest.raises(ValueError, match=r"attention_mask.*0 and 1"):
        sat_model(x, attention_mask=mask)


def test_attention_mask_float_values_other_than_0_1(sat_model):
    x, mask = padded_batch([400, 300])
    mask = mask.float()
    mask[1, 0] = 0.5
    with pytest.raises(ValueError, match=r"attention_mask.*0 and 1"):
        sat_model(x, attention_mask=mask)


def test_attention_mask_left_padding(sat_model):
    x, _ = padded_batch([400, 400])
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, :100] = 0
    with pytest.raises(ValueError, match=r"attention_mask.*right-padded"):
        sat_model(x, attention_mask=mask)


def test_attention_mask_hole(sat_model):
    x, mask = padded_batch([400, 350])
    mask[0, 200] = 0
    with pytest.raises(ValueError, match=r"attention_mask.*right-padded"):
        sat_model(x, attention_mask=mask.bool())


def test_attention_mask_row_shorter_than_receptive_field(sat_model):
    x, mask = padded_batch([400, RF - 1])
    with pytest.raises(ValueError, match=rf"attention_mask.*\[1\].*\b{RF}\b"):
        sat_model(x, attention_mask=mask)
    x, mask = padded_batch([400, 0])  # an all-padding row
    with pytest.raises(ValueError, match=rf"attention_mask.*\b{RF}\b"):
        sat_model(x, attention_mask=mask)


def test_attention_mask_row_of_exactly_receptive_field_works(sat_model):
    x, mask = padded_batch([400, RF])
    with torch.no_grad():
        out = sat_model(x, attention_mask=mask)
    assert out.last_hidden_state.shape[0] == 2


# ------------------------------------------------------------------------------------------ head_mask
@pytest.mark.parametrize(
    "shape", [(3,), (3, 2), (1, 2), (2, 3), (2, 1, 2), (1, 2, 1, 1, 1)],
    ids=["3_heads", "3_layers", "1_layer", "2x3", "rank3", "rank5"],
)
def test_head_mask_wrong_shape(sat_model, shape):
    # tiny config: 2 layers, 2 heads
    with pytest.raises(ValueError, match=r"head_mask.*\(2,\).*\(2, 2\)") as excinfo:
        sat_model(torch.randn(1, 400), head_mask=torch.ones(*shape))
    assert str(tuple(shape)) in str(excinfo.value)


def test_head_mask_wrong_layers_distinguishable():
    model = _model(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"head_mask.*\(2,\).*\(3, 2\).*\(2, 2\)"):
        model(torch.randn(1, 400), head_mask=torch.ones(2, 2))


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.complex64])
def test_head_mask_bad_dtype(sat_model, dtype):
    with pytest.raises(TypeError, match="head_mask"):
        sat_model(torch.randn(1, 400), head_mask=torch.ones(2, dtype=dtype))


def test_head_mask_not_a_tensor(sat_model):
    with pytest.raises(TypeError, match="head_mask"):
        sat_model(torch.randn(1, 400), head_mask=[1.0, 1.0])


def test_valid_head_masks_work(sat_model):
    with torch.no_grad():
        for hm in (torch.ones(2), torch.ones(2, 2), torch.tensor([True, False])):
            sat_model(torch.randn(1, 400), head_mask=hm)


# ------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("family", ["UniSpeech", "UniSpeechSat"])
def test_ctc_labels_out_of_vocab(family):
    model = _model(family, "ForCTC")
    labels = torch.tensor([[1, 2, 32]])
    with pytest.raises(ValueError, match=r"Label values must be <= vocab_size: 32"):
        model(torch.randn(1, 800), labels=labels)


@pytest.mark.parametrize("bad", [-1, -99, -101])
def test_ctc_negative_labels(bad):
    model = _model("UniSpeechSat", "ForCTC")
    with pytest.raises(ValueError, match=r"labels.*-100"):
        model(torch.randn(1, 800), labels=torch.tensor([[1, bad, 3]]))


def test_ctc_labels_minus_100_padding_works():
    model = _model("UniSpeechSat", "ForCTC")
    with torch.no_grad():
        out = model(torch.randn(2, 800), labels=torch.tensor([[1, 2, 3], [4, -100, -100]]))
    assert torch.isfinite(out.loss)


def test_ctc_labels_bad_shape_and_dtype():
    model = _model("UniSpeech", "ForCTC")
    with pytest.raises(ValueError, match=r"labels.*\[batch=2, target_length\]"):
        model(torch.randn(2, 800), labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels.*batch=2"):
        model(torch.randn(2, 800), labels=torch.tensor([[1, 2, 3]]))
    with pytest.raises(TypeError, match="labels"):
        model(torch.randn(2, 800), labels=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


_CLASS_HEADS = [("UniSpeech", "ForSequenceClassification"), ("UniSpeechSat", "ForSequenceClassification"),
                ("UniSpeechSat", "ForXVector")]


@pytest.mark.parametrize("family,head", _CLASS_HEADS)
@pytest.mark.parametrize("bad", [3, 7, -1, -101])
def test_class_labels_out_of_range(family, head, bad):
    model = _model(family, head)  # num_labels=3
    with pytest.raises(ValueError, match=r"labels.*\[0, 2\].*num_labels=3.*-100"):
        model(torch.randn(2, 800), labels=torch.tensor([0, bad]))


@pytest.mark.parametrize("family,head", _CLASS_HEADS)
def test_class_labels_wrong_count(family, head):
    model = _model(family, head)
    with pytest.raises(ValueError, match=r"labels.*\(2,\).*\(3,\)"):
        model(torch.randn(2, 800), labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels.*\(2,\)"):
        model(torch.randn(2, 800), labels=torch.tensor([1]))


@pytest.mark.parametrize("family,head", _CLASS_HEADS)
def test_class_labels_float_dtype(family, head):
    model = _model(family, head)
    with pytest.raises(TypeError, match="labels"):
        model(torch.randn(2, 800), labels=torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("labels", [[-100, 1], [-100, -100]])
def test_xvector_labels_minus_100_are_refused_before_the_loss(labels):
    """The AM-softmax loss has no ignore index (nor has transformers'): -100 is a clear error naming labels and
    the valid range, not torch's "Class values must be non-negative." from inside the loss."""
    model = _model("UniSpeechSat", "ForXVector")  # num_labels=3
    with pytest.raises(ValueError, match=r"^labels must be in \[0, 2\] \(num_labels=3\) \(the AM-softmax loss has no "
                                         r"ignore index: -100 is not allowed\), got values in \[-100, "):
        model(torch.randn(2, 800), labels=torch.tensor(labels))


@pytest.mark.parametrize("family", ["UniSpeech", "UniSpeechSat"])
def test_sequence_classification_labels_minus_100_are_ignored(family):
    model = _model(family, "ForSequenceClassification")
    x = torch.randn(2, 800)
    with torch.no_grad():
        out = model(x, labels=torch.tensor([-100, 1]))
    assert torch.equal(out.loss, torch.nn.functional.cross_entropy(out.logits[1:], torch.tensor([1])))


def test_sequence_classification_valid_labels_work():
    model = _model("UniSpeechSat", "ForSequenceClassification")
    with torch.no_grad():
        out = model(torch.randn(2, 800), labels=torch.tensor([2, 0]))
    assert torch.isfinite(out.loss)


def test_ctc_complex_labels():
    model = _model("UniSpeechSat", "ForCTC")
    with pytest.raises(TypeError, match="labels"):
        model(torch.randn(1, 800), labels=torch.tensor([[1j, 2j]]))


_LABEL_HEADS = [("UniSpeech", "ForCTC", torch.tensor([[1, 2]])),
                ("UniSpeech", "ForSequenceClassification", torch.tensor([1])),
                ("UniSpeechSat", "ForXVector", torch.tensor([1]))]


@pytest.mark.parametrize("family,head,labels", _LABEL_HEADS, ids=[h for _, h, _ in _LABEL_HEADS])
def test_bad_input_values_are_blamed_even_with_labels(family, head, labels):
    """The input_values checks come first: a bad waveform is reported as such, not as a labels problem
    (or an AttributeError) because labels were validated against it first."""
    model = _model(family, head)
    with pytest.raises(TypeError, match=r"input_values.*torch\.Tensor"):
        model([[0.0] * 800], labels=labels)
    with pytest.raises(ValueError, match=r"input_values.*\[batch, samples\]"):
        model(torch.randn(800), labels=labels)


def test_xvector_input_too_short_for_tdnn_is_a_value_error():
    """400 samples give 4 frames; the TDNN stack (kernels 3, 3; dilations 1, 2) needs 8 to leave the 2
    that pooling needs. The user must get a ValueError asking for longer input, not conv1d's
    RuntimeError about kernel sizes."""
    model = _model("UniSpeechSat", "ForXVector")
    with pytest.raises(ValueError, match=r"TDNN.*longer input"):
        model(torch.randn(1, 400))


def test_xvector_padded_row_too_short_for_tdnn_is_a_value_error():
    model = _model("UniSpeechSat", "ForXVector")
    x, mask = padded_batch([2000, 400])
    with pytest.raises(ValueError, match=r"sample 1 .*TDNN.*longer input"):
        model(x, attention_mask=mask)


@pytest.mark.parametrize("shape", [(2, 4), (2, 5, 3), (2, 4, 2), (1, 4, 3)])
def test_audio_frame_labels_wrong_shape(shape):
    model = _model("UniSpeechSat", "ForAudioFrameClassification")
    x = torch.randn(2, 400)  # 4 frames
    with pytest.raises(ValueError, match=r"labels.*\[batch, frames, num_labels\].*\(2, 4, 3\)"):
        model(x, labels=torch.zeros(*shape))
    with torch.no_grad():
        assert torch.isfinite(model(x, labels=torch.zeros(2, 4, 3)).loss)


# ------------------------------------------------------------------------------------------ mask_time_indices
@pytest.mark.parametrize("shape", [(1, 5), (2, 4), (1, 4, 1), (4,)])
def test_mask_time_indices_wrong_shape(sat_model, shape):
    x = torch.randn(1, 400)  # 4 frames
    with pytest.raises(ValueError, match=r"mask_time_indices.*\[batch, frames\].*\(1, 4\)"):
        sat_model(x, mask_time_indices=torch.zeros(*shape, dtype=torch.bool))
    with torch.no_grad():
        sat_model(x, mask_time_indices=torch.zeros(1, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ unknown kwargs
@pytest.mark.parametrize("family,head", ALL_CLASSES)
def test_unknown_forward_kwarg(family, head):
    model = _model(family, head)
    with pytest.raises(TypeError, match="foo"):
        model(torch.randn(1, 400), foo=1)


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states", "return_dict"])
def test_output_flags_must_be_bool(sat_model, flag):
    with pytest.raises(TypeError, match=flag):
        sat_model(torch.randn(1, 400), **{flag: "yes"})


# ------------------------------------------------------------------------------------------ checkpoints
def _save_hf(tmp_path, family="UniSpeechSat", head="Model", **overrides):
    hf_model(family, head, **overrides).save_pretrained(tmp_path)
    return tmp_path


def test_truncated_safetensors(tmp_path):
    _save_hf(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(uf.CheckpointError) as excinfo:
        uf.UniSpeechSatModel.from_pretrained(tmp_path)
    assert str(file) in str(excinfo.value)


@pytest.mark.parametrize(
    "garbage", [b"this is not a safetensors file" * 10, b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"],
    ids=["text", "empty", "header_only"],
)
def test_garbage_safetensors(tmp_path, garbage):
    _save_hf(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(garbage)
    with pytest.raises(uf.CheckpointError) as excinfo:
        uf.UniSpeechSatModel.from_pretrained(tmp_path)
    assert str(file) in str(excinfo.value)


def test_truncated_pytorch_model_bin(tmp_path):
    _save_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    file = tmp_path / "pytorch_model.bin"
    torch.save(state, file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(uf.CheckpointError) as excinfo:
        uf.UniSpeechSatModel.from_pretrained(tmp_path)
    assert str(file) in str(excinfo.value)


def test_pytorch_model_bin_that_is_not_a_state_dict(tmp_path):
    _save_hf(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    file = tmp_path / "pytorch_model.bin"
    torch.save([torch.zeros(2)], file)
    with pytest.raises(uf.CheckpointError, match="state dict") as excinfo:
        uf.UniSpeechSatModel.from_pretrained(tmp_path)
    assert str(file) in str(excinfo.value)


def test_directory_without_weights(tmp_path):
    _save_hf(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(uf.CheckpointError, match=r"no weights found.*model\.safetensors") as excinfo:
        uf.UniSpeechSatModel.from_pretrained(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(uf.CheckpointError, match="config.json"):
        uf.UniSpeechSatModel.from_pretrained(tmp_path)


def test_nonexistent_local_path(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        uf.UniSpeechSatModel.from_pretrained(path)
    with pytest.raises(FileNotFoundError):
        uf.UniSpeechSatModel.from_pretrained(tmp_path / "nope")  # a PathLike works the same way


def test_file_instead_of_directory(tmp_path):
    _save_hf(tmp_path)
    with pytest.raises(uf.CheckpointError, match="directory"):
        uf.UniSpeechSatModel.from_pretrained(tmp_path / "model.safetensors")


def test_tensor_shape_mismatch_lists_key(tmp_path):
    _save_hf(tmp_path, intermediate_size=20)
    key = r"encoder\.layers\.0\.feed_forward\.intermediate_dense\.weight"
    with pytest.raises(uf.CheckpointError, match=key) as excinfo:
        uf.UniSpeechSatModel.from_pretrained(tmp_path, intermediate_size=24)
    msg = str(excinfo.value)
    assert "(20, 16)" in msg and "(24, 16)" in msg
    assert str(tmp_path) in msg


def _drop_key(tmp_path, key):
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    assert key in state
    del state[key]
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("family,prefix", [("UniSpeech", "unispeech"), ("UniSpeechSat", "unispeech_sat")])
def test_missing_backbone_key(tmp_path, family, prefix):
    _save_hf(tmp_path, family)
    key = "encoder.layers.1.final_layer_norm.bias"
    _drop_key(tmp_path, key)
    model_cls = getattr(uf, family + "Model")
    with pytest.raises(uf.CheckpointError, match=re.escape(key)) as excinfo:
        model_cls.from_pretrained(tmp_path)
    assert "strict=False" in str(excinfo.value)
    model = model_cls.from_pretrained(tmp_path, strict=False)
    assert model.loading_info["missing_keys"] == [key]
    # Into a head: the backbone key is missing under the prefix, and the error is the same.
    head_cls = getattr(uf, family + "ForCTC")
    with pytest.raises(uf.CheckpointError, match=re.escape(f"{prefix}.{key}")):
        head_cls.from_pretrained(tmp_path)
    model = head_cls.from_pretrained(tmp_path, strict=False)
    assert model.loading_info["missing_keys"] == [f"{prefix}.{key}"]


def test_unexpected_backbone_key(tmp_path):
    _save_hf(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    state["encoder.layers.7.extra.weight"] = torch.zeros(2)
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(uf.CheckpointError, match=r"unexpected keys.*encoder\.layers\.7\.extra\.weight"):
        uf.UniSpeechSatModel.from_pretrained(tmp_path)
    model = uf.UniSpeechSatModel.from_pretrained(tmp_path, strict=False)
    assert model.loading_info["unexpected_keys"] == ["encoder.layers.7.extra.weight"]


def test_sharded_index_with_missing_shard(tmp_path):
    hf_model("UniSpeechSat", "Model").save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 1
    os.remove(tmp_path / shards[-1])
    with pytest.raises(uf.CheckpointError, match=re.escape(shards[-1])) as excinfo:
        uf.UniSpeechSatModel.from_pretrained(tmp_path)
    assert str(index) in str(excinfo.value)


def test_sharded_index_that_is_corrupt(tmp_path):
    hf_model("UniSpeechSat", "Model").save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": ')
    with pytest.raises(uf.CheckpointError, match="shard index") as excinfo:
        uf.UniSpeechSatModel.from_pretrained(tmp_path)
    assert str(index) in str(excinfo.value)


def test_sharded_index_listing_absent_key(tmp_path):
    hf_model("UniSpeechSat", "Model").save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first_shard = sorted(set(data["weight_map"].values()))[0]
    data["weight_map"]["encoder.ghost.weight"] = first_shard
    index.write_text(json.dumps(data))
    with pytest.raises(uf.CheckpointError, match=r"encoder\.ghost\.weight") as excinfo:
        uf.UniSpeechSatModel.from_pretrained(tmp_path)
    assert str(index) in str(excinfo.value)


# ------------------------------------------------------------------------------------------ dispatch
def test_unknown_backend_name_lists_valid_names():
    with pytest.raises(ValueError, match="nope") as excinfo:
        with uf.backend("nope"):
            pass
    for name in ("auto", "eager", "cpp", "cuda", "triton"):
        assert repr(name) in str(excinfo.value)


def test_unknown_backend_env_var(sat_model, monkeypatch):
    monkeypatch.setenv("UNISPEECH_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"UNISPEECH_FAST_BACKEND.*'eager'.*'nope'"):
        sat_model(torch.randn(1, 400))
    with pytest.raises(ValueError, match="UNISPEECH_FAST_BACKEND"):
        uf.current_backend()


def test_backend_context_overrides_bad_env_var(sat_model, monkeypatch):
    monkeypatch.setenv("UNISPEECH_FAST_BACKEND", "nope")
    with uf.backend("eager"), torch.no_grad():
        sat_model(torch.randn(1, 400))


@pytest.mark.parametrize(
    "name,expected_reason",
    [
        ("triton", r"triton is not installed|TRITON_INTERPRET=1|no triton implementation"),
        ("cuda", r"cuda serves CUDA tensors, got cpu"),
        ("cpp", r"C\+\+ extension not available|no cpp implementation|no backward"),
    ],
)
def test_forced_backend_on_cpu_raises_with_reasons(sat_model, monkeypatch, name, expected_reason):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("UNISPEECH_FAST_BACKEND", raising=False)
    x = torch.randn(1, 400)
    with pytest.raises(uf.BackendNotSupportedError, match=rf"backend '{name}' cannot run") as excinfo:
        with uf.backend(name):
            sat_model(x)
    msg = str(excinfo.value)
    assert re.search(expected_reason, msg), msg
    assert "\n  - " in msg  # reasons are listed, one per line
    # The call is described: the failing op's tensors with shape, dtype and device. Which op fails first
    # depends on what was built (with the C++ extension, cpp runs the feature extractor and then stops at
    # attention), so the shape is matched as a pattern.
    assert re.search(r"\((\d+, )*\d+\) float32 cpu", msg), msg


def test_forced_backend_does_not_fall_back(sat_model, monkeypatch):
    """A forced backend that cannot run raises; eager is never run in its place."""
    from unispeech_fast import dispatch

    monkeypatch.delenv("UNISPEECH_FAST_BACKEND", raising=False)
    import unispeech_fast.ops  # noqa: F401  (importing the ops registers their backends)
    eager = dispatch._REGISTRY["feature_extractor"]["eager"]
    calls = []

    def spy(**inputs):
        calls.append(1)
        return eager.fn(**inputs)

    monkeypatch.setitem(dispatch._REGISTRY["feature_extractor"], "eager",
                        dispatch.OpImpl(eager.op, eager.backend, spy, eager.not_supported_reasons, eager.is_stochastic))
    with uf.backend("eager"), torch.no_grad():
        sat_model(torch.randn(1, 400))
    assert calls == [1]  # the spy is live
    with uf.backend("cuda"):
        with pytest.raises(uf.BackendNotSupportedError):
            sat_model(torch.randn(1, 400))
    assert calls == [1]
    assert uf.current_backend() == "auto"
