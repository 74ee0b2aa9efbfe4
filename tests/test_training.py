"""Our models inside transformers' Trainer on CPU: a few steps of each head, gradient checkpointing,
bf16 autocast, checkpoints that from_pretrained loads, and Trainer's own resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import unispeech_fast as uf
from conftest import tiny_config_kwargs

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from unispeech_fast.masking import compute_mask_indices_per_sample  # noqa: E402
from unispeech_fast.training import SaveConfigCallback, SpeechDataCollator, sample_seed  # noqa: E402

NO_DROPOUT = dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                  final_dropout=0.0, layerdrop=0.0)


def _labels(head: str, index: int, samples: int, config) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + index)
    if head == "ForCTC":
        return torch.randint(1, config.vocab_size, (3,), generator=g)
    if head in ("ForSequenceClassification", "ForXVector"):
        return torch.randint(0, config.num_labels, (), generator=g)
    frames = samples
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        frames = (frames - kernel) // stride + 1
    if head == "ForAudioFrameClassification":
        return torch.nn.functional.one_hot(torch.randint(0, config.num_labels, (frames,), generator=g),
                                           config.num_labels).float()
    if head == "ForPreTraining" and config.model_type == "unispeech-sat":  # k-means cluster id per frame
        return torch.randint(0, config.num_clusters, (frames,), generator=g)
    if head == "ForPreTraining":  # phone ids for the CTC branch (0 = pad_token_id is the blank)
        return torch.randint(1, config.num_ctc_classes, (3,), generator=g)
    raise ValueError(head)


class TinySpeechDataset(torch.utils.data.Dataset):
    """Random waveforms of a few lengths with labels for ``head``; ``mask_seed`` per global index."""

    def __init__(self, head: str, config, n: int = 8, equal_lengths: bool = False) -> None:
        self.head, self.config, self.n, self.equal = head, config, n, equal_lengths

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        samples = 1200 if self.equal else 1100 + 37 * i
        wave = torch.randn(samples, generator=torch.Generator().manual_seed(i))
        return {"input_values": wave, "labels": _labels(self.head, i, samples, self.config),
                "mask_seed": sample_seed(0, i)}


def _model(family: str, head: str, **overrides):
    if family == "UniSpeechSat" and head == "ForPreTraining":
        overrides = {"proj_codevector_dim": 24, **overrides}  # the SAT loss compares the two by cosine
    kw = tiny_config_kwargs(family, **{"mask_time_prob": 0.3, "mask_time_length": 2, **overrides})
    config = getattr(uf, family + "Config")(**kw)
    torch.manual_seed(0)
    return getattr(uf, family + head)(config)


def _trainer(model, head, tmp_path, max_steps=3, callbacks=(), equal_lengths=False, **args):
    kw = dict(output_dir=str(tmp_path), use_cpu=True, max_steps=max_steps, per_device_train_batch_size=2,
              learning_rate=1e-3, report_to=[], logging_steps=1, disable_tqdm=True, save_strategy="no",
              remove_unused_columns=False, seed=0, dataloader_num_workers=0)
    kw.update(args)
    return transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**kw),
        train_dataset=TinySpeechDataset(head, model.config, equal_lengths=equal_lengths),
        data_collator=SpeechDataCollator(model, num_negatives=_num_negatives(model.config, head),
                                         noise_seeds=head == "ForPreTraining"),
        callbacks=list(callbacks),
    )


def _num_negatives(config, head: str) -> int | None:
    """UniSpeechForPreTraining's contrastive loss needs negatives: the collator draws them per sample."""
    return config.num_negatives if head == "ForPreTraining" and config.model_type == "unispeech" else None


def _losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


# Adding a head is one entry here (test_ddp.py runs the same list).
TRAINER_CASES = [
    ("UniSpeechSat", "ForCTC"),
    ("UniSpeechSat", "ForSequenceClassification"),
    ("UniSpeechSat", "ForAudioFrameClassification"),
    ("UniSpeechSat", "ForXVector"),
    ("UniSpeech", "ForCTC"),
    ("UniSpeech", "ForSequenceClassification"),
    ("UniSpeechSat", "ForPreTraining"),  # cluster labels: masked prediction + utterance contrastive + ...
    ("UniSpeech", "ForPreTraining"),  # phone labels: contrastive + diversity + CTC
]


@pytest.mark.parametrize("family,head", TRAINER_CASES)
def test_trainer_trains_each_head_and_its_checkpoint_loads(family, head, tmp_path):
    model = _model(family, head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(model, head, tmp_path, save_strategy="steps", save_steps=3, callbacks=[SaveConfigCallback()])
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    after = model.state_dict()
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert f"{model.base_model_prefix}.encoder.layers.0.attention.q_proj.weight" in changed
    # Trainer wrote only the weights; the callback added config.json, so the checkpoint loads as ours.
    loaded = type(model).from_pretrained(tmp_path / "checkpoint-3")
    assert type(loaded) is type(model) and loaded.config.num_labels == model.config.num_labels
    for key, value in after.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    # and our save_pretrained of the trained model loads too (in transformers as well)
    model.save_pretrained(tmp_path / "final")
    theirs = getattr(transformers, family + head).from_pretrained(tmp_path / "final")
    key = f"{model.base_model_prefix}.encoder.layers.0.attention.q_proj.weight"
    torch.testing.assert_close(theirs.state_dict()[key], after[key], rtol=0, atol=0)


def test_trainer_batch_without_loss_fails_instead_of_training_on_logits(tmp_path):
    """No labels -> no loss. Our outputs are not dicts, so Trainer takes ``outputs[0]`` (the logits) as
    the loss; backward then refuses the non-scalar tensor: an error, never a silent step."""
    model = _model("UniSpeechSat", "ForCTC")
    trainer = _trainer(model, "ForCTC", tmp_path)
    trainer.train_dataset = [{"input_values": torch.randn(1200), "mask_seed": 1}] * 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="scalar outputs"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_gradient_checkpointing_equals_plain_run(tmp_path):
    runs = {}
    for gc in (False, True):
        model = _model("UniSpeechSat", "ForCTC", **NO_DROPOUT)
        trainer = _trainer(model, "ForCTC", tmp_path / str(gc), max_steps=2, gradient_checkpointing=gc)
        trainer.train()
        assert model.is_gradient_checkpointing is gc and model.is_activation_checkpointing is gc
        runs[gc] = (_losses(trainer), model.state_dict())
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-6, atol=1e-6)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_trainer_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """The loss is a batch mean (accepts_loss_kwargs=False): Trainer scales it by the accumulation steps,
    so 2 x 1 accumulated equals 1 x 2 (masks come from the sample seeds, so they agree too)."""
    runs = []
    for batch, accumulate in ((2, 1), (1, 2)):
        model = _model("UniSpeechSat", "ForCTC", **NO_DROPOUT)
        trainer = _trainer(model, "ForCTC", tmp_path / str(batch), max_steps=2, equal_lengths=True,
                           per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                           optim="sgd", learning_rate=0.05)
        trainer.train()
        runs.append(model.state_dict())
    for key, value in runs[0].items():
        torch.testing.assert_close(runs[1][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_trainer_bf16_autocasts_on_cpu(tmp_path):
    """Trainer's bf16=True on CPU runs the forward under CPU bf16 autocast (weights stay fp32)."""
    model = _model("UniSpeechSat", "ForSequenceClassification")
    seen = []
    layer = model.base_model.encoder.layers[0].feed_forward.output_dense
    layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = _trainer(model, "ForSequenceClassification", tmp_path, max_steps=2, bf16=True)
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}
    assert model.dtype == torch.float32
    assert all(np.isfinite(_losses(trainer)))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("family,head", [("UniSpeechSat", "ForCTC"), ("UniSpeech", "ForPreTraining"),
                                         ("UniSpeechSat", "ForPreTraining")])
def test_trainer_mixed_precision_on_gpu(tmp_path, precision, family, head):
    """Trainer on CUDA: fp16=True runs the forward under fp16 autocast with a GradScaler (Accelerate's),
    bf16=True under bf16 autocast; the weights stay fp32 and finite and the losses finite."""
    model = _model(family, head)
    seen = []
    layer = model.base_model.encoder.layers[0].feed_forward.output_dense
    layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = _trainer(model, head, tmp_path, max_steps=3, use_cpu=False, **{precision: True})
    trainer.train()
    assert (trainer.accelerator.scaler is not None) == (precision == "fp16")
    assert seen and set(seen) == {torch.float16 if precision == "fp16" else torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.is_cuda and torch.isfinite(p).all() for p in model.parameters())
    assert len(_losses(trainer)) == 3 and all(np.isfinite(_losses(trainer)))


def test_trainer_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    """Dropout, LayerDrop and SpecAugment on: Trainer restores its RNG states, our masks come from seeds."""
    full = _model("UniSpeechSat", "ForCTC", layerdrop=0.3)
    trainer = _trainer(full, "ForCTC", tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2,
                       callbacks=[SaveConfigCallback()])
    trainer.train()
    resumed = _model("UniSpeechSat", "ForCTC", layerdrop=0.3)
    trainer2 = _trainer(resumed, "ForCTC", tmp_path / "resumed", max_steps=4)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert trainer2.state.global_step == 4
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


# ------------------------------------------------------------------------------ what Trainer asks of a model
def test_trainer_facing_attributes():
    model = _model("UniSpeechSat", "ForCTC")
    assert model.main_input_name == "input_values" and model.supports_gradient_checkpointing
    assert model.can_generate() is False and model._keys_to_ignore_on_save is None
    n = sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() == n
    model.freeze_feature_encoder()
    frozen = sum(p.numel() for p in model.base_model.feature_extractor.parameters())
    assert model.num_parameters(only_trainable=True, exclude_embeddings=True) == n - frozen


def test_floating_point_ops_counts_conv_macs_and_per_frame_parameters():
    model = _model("UniSpeechSat", "ForCTC")
    x = torch.zeros(3, 1000)
    macs, h = [], x[:, None, :]
    for conv, stride in zip(model.base_model.feature_extractor.conv_layers, model.config.conv_stride):
        h = torch.nn.functional.conv1d(h, conv.conv.weight.detach(), stride=stride)  # MACs = out length x weight
        macs.append(h.shape[-1] * conv.conv.weight.numel())
    with torch.no_grad():
        frames = model.eval()(x).logits.shape[1]
    assert frames == h.shape[-1]
    feat = sum(p.numel() for p in model.base_model.feature_extractor.parameters())
    expected = 6 * 3 * (sum(macs) + frames * (model.num_parameters() - feat))
    assert model.floating_point_ops({"input_values": x}) == expected
    with pytest.raises(ValueError, match="input_values"):
        model.floating_point_ops({"input_ids": x})


def test_gradient_checkpointing_enable_accepts_transformers_arguments_and_rejects_the_rest():
    model = _model("UniSpeechSat", "ForCTC")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=1)
    assert model.is_gradient_checkpointing
    model.activation_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="every_n_layers"):
        model.activation_checkpointing_enable(every_n_layers=2)
    with pytest.raises(ValueError, match="offload"):
        model.activation_checkpointing_enable(offload=True)
    assert not model.is_gradient_checkpointing


# ------------------------------------------------------------------------------ the seeding rule's pieces
def _layerdrop_decisions(model, x) -> list[int]:
    ran = []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, layer in enumerate(model.base_model.encoder.layers)]
    model(x)
    for h in hooks:
        h.remove()
    return ran


def test_seed_layerdrop_gives_decisions_independent_of_batch_and_dropout():
    model = _model("UniSpeechSat", "ForCTC", layerdrop=0.5, num_hidden_layers=6, mask_time_prob=0.0).train()
    runs = []
    for batch in (1, 3):
        model.seed_layerdrop(7)
        torch.manual_seed(batch)  # a different global stream (as on another rank)
        runs.append([_layerdrop_decisions(model, torch.randn(batch, 1000)) for _ in range(4)])
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 1  # it does drop, and differently per step
    model.seed_layerdrop(None)  # back to the global stream transformers uses
    assert model.base_model.encoder.layerdrop_generator is None
    with pytest.raises(TypeError, match="seed"):
        model.seed_layerdrop(1.5)


def test_per_sample_masks_depend_only_on_the_sample():
    seeds = [sample_seed(0, i) for i in range(4)]
    lengths = [20, 13, 20, 7]
    whole = compute_mask_indices_per_sample(lengths, 20, 0.4, 2, seeds, min_masks=1)
    halves = [compute_mask_indices_per_sample(lengths[k:k + 2], 24, 0.4, 2, seeds[k:k + 2], min_masks=1)
              for k in (0, 2)]  # another batch split and another padded length
    np.testing.assert_array_equal(whole, np.concatenate([h[:, :20] for h in halves]))
    assert not any(h[:, 20:].any() for h in halves)
    for row, n in zip(whole, lengths):
        assert row[:n].any() and not row[n:].any()
    assert not np.array_equal(whole[0], whole[2])  # distinct seeds, distinct spans
    assert sample_seed(0, 1) != sample_seed(0, 1, epoch=1) != sample_seed(1, 1)
    with pytest.raises(ValueError, match="seeds"):
        compute_mask_indices_per_sample(lengths, 20, 0.4, 2, seeds[:3])
    with pytest.raises(ValueError, match="index"):
        sample_seed(0, -1)


def test_collator_pads_labels_and_masks():
    model = _model("UniSpeechSat", "ForCTC")
    collate = SpeechDataCollator(model)
    batch = collate([{"input_values": torch.ones(1100), "labels": torch.tensor([1, 2, 3]), "mask_seed": 1},
                     {"input_values": torch.ones(1300), "labels": torch.tensor([4]), "mask_seed": 2}])
    assert batch["input_values"].shape == (2, 1300) and batch["attention_mask"][0].sum() == 1100
    assert batch["input_values"][0, 1100:].abs().sum() == 0
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    frames = model._get_feat_extract_output_lengths(1300)
    assert batch["mask_time_indices"].shape == (2, frames) and batch["mask_time_indices"].dtype == torch.bool
    assert not batch["mask_time_indices"][0, model._get_feat_extract_output_lengths(1100):].any()
    assert "mask_time_indices" not in collate([{"input_values": torch.ones(1100)}])  # evaluation: no seed
    with pytest.raises(ValueError, match="mask_seed"):
        collate([{"input_values": torch.ones(1100), "mask_seed": 1}, {"input_values": torch.ones(1100)}])
    with pytest.raises(ValueError, match="pad_to_samples"):
        SpeechDataCollator(model, pad_to_samples=1000)([{"input_values": torch.ones(1100)}])


def test_collator_negatives_depend_only_on_the_sample():
    """UniSpeech's negatives (num_negatives) are drawn per sample from its seed, among its own masked
    frames: another batch split and another padded length give the same frames."""
    model = _model("UniSpeech", "ForPreTraining")
    collate = SpeechDataCollator(model, num_negatives=6)
    examples = [{"input_values": torch.randn(1100 + 60 * i, generator=torch.Generator().manual_seed(i)),
                 "mask_seed": sample_seed(0, i)} for i in range(4)]

    def per_row(batch):  # each masked frame's negatives as frame positions within its own row
        frames = batch["mask_time_indices"].shape[1]
        rows = []
        for b in range(batch["mask_time_indices"].shape[0]):
            masked = batch["mask_time_indices"][b]
            negatives = batch["sampled_negative_indices"][b][masked] - b * frames
            assert masked[negatives].all()  # other masked frames of the same row, never padding
            rows.append((masked.nonzero().squeeze(1).tolist(), negatives.tolist()))
        return rows

    whole = per_row(collate(examples))
    halves = per_row(collate(examples[:2])) + per_row(SpeechDataCollator(model, pad_to_samples=1500,
                                                                          num_negatives=6)(examples[2:]))
    assert whole == halves and all(len(masked) >= 2 for masked, _ in whole)
    assert whole[0][1] != whole[1][1]
    with pytest.raises(ValueError, match="num_negatives needs training examples with 'mask_seed'"):
        collate([{"input_values": torch.ones(1100)}])
    with pytest.raises(ValueError, match="num_negatives must be a positive int"):
        SpeechDataCollator(model, num_negatives=0)


def test_collator_noise_seeds_depend_only_on_the_sample():
    """noise_seeds=True gives each example an int64 seed of its own, derived from its mask_seed (the
    pre-training heads draw its Gumbel noise and replace mix from it), whatever the batch."""
    model = _model("UniSpeech", "ForPreTraining")
    collate = SpeechDataCollator(model, noise_seeds=True)
    examples = [{"input_values": torch.randn(1100 + 60 * i, generator=torch.Generator().manual_seed(i)),
                 "mask_seed": sample_seed(0, i)} for i in range(4)]
    seeds = collate(examples)["noise_seeds"]
    assert seeds.dtype == torch.int64 and seeds.shape == (4,) and (seeds >= 0).all() and len(set(seeds.tolist())) == 4
    halves = torch.cat([collate(examples[2:])["noise_seeds"], collate(examples[:2])["noise_seeds"]])
    assert torch.equal(halves, seeds[[2, 3, 0, 1]])
    assert "noise_seeds" not in SpeechDataCollator(model)(examples)  # only when asked (other heads refuse it)
    with pytest.raises(ValueError, match="noise_seeds=True needs training examples with 'mask_seed'"):
        collate([{"input_values": torch.ones(1100)}])
    with pytest.raises(ValueError, match="noise_seeds must be a bool"):
        SpeechDataCollator(model, noise_seeds=1)
