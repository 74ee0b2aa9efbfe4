"""``unispeech-fast finetune`` and ``pretrain``: manifests, bucketing, each task and pre-training
family, the pre-training draws and Gumbel schedule, exact resume (1 process and 2 gloo ranks under
torchrun), bad files skipped and listed, a NaN loss stopping the run (tiny models, CPU)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import unispeech_fast as uf
from conftest import tiny_config_kwargs

sf = pytest.importorskip("soundfile")

from unispeech_fast import cli  # noqa: E402
from unispeech_fast.train.data import ManifestError, encode_labels, plan_batches, read_manifest  # noqa: E402

LENGTHS = [1600, 2400, 3200, 2000, 4000, 2800, 1800, 3600]  # samples at 16 kHz
TEXTS = ["ab", "ba c", "cab", "a", "abc ab", "bc", "c", "ca b"]
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "a": 5, "b": 6, "c": 7}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(tmp_path, family="UniSpeechSat", **overrides) -> pathlib.Path:
    """A tiny backbone checkpoint (dropout, LayerDrop and SpecAugment on) with vocab.json (and, for
    UniSpeech-SAT, proj_codevector_dim == codevector_dim as its pre-training loss needs)."""
    sat = {"proj_codevector_dim": 24} if family == "UniSpeechSat" else {}
    kw = tiny_config_kwargs(family, **{"mask_time_prob": 0.3, "mask_time_length": 2, "layerdrop": 0.5,
                                       "hidden_dropout": 0.1, "vocab_size": len(VOCAB), **sat, **overrides})
    torch.manual_seed(0)
    model = getattr(uf, family + "Model")(getattr(uf, family + "Config")(**kw))
    out = tmp_path / "base"
    model.save_pretrained(out)
    (out / "vocab.json").write_text(json.dumps(VOCAB))
    return out


def _corpus(tmp_path, labels="text", extra=()) -> pathlib.Path:
    """WAV files and a JSONL manifest; ``extra`` adds (name, samples or None for a corrupt file, array)."""
    rng = np.random.default_rng(0)
    audio = tmp_path / "audio"
    audio.mkdir(exist_ok=True)
    rows = []
    for i, n in enumerate(LENGTHS):
        sf.write(audio / f"u{i}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        label = TEXTS[i] if labels == "text" else i % 3
        rows.append({"path": f"audio/u{i}.wav", "duration": n / 16000, "label": label})
    for name, wave, label in extra:
        if wave is None:
            (audio / name).write_bytes(b"RIFF\x00\x00not really a wav")
            duration = 0.2
        else:
            sf.write(audio / name, wave, 16000, subtype="FLOAT")
            duration = len(wave) / 16000
        rows.append({"path": f"audio/{name}", "duration": duration, "label": label})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _finetune(model, manifest, out, *args) -> int:
    return cli.main(["finetune", "--model", str(model), "--manifest", str(manifest), "--output-dir", str(out),
                     "--max-batch-seconds", "0.45", "--quiet", "--seed", "3", *args])


def _weights(directory) -> dict:
    from safetensors.torch import load_file

    return load_file(str(pathlib.Path(directory) / "model.safetensors"))


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ============================================================================================ data
def test_manifest_formats_agree(tmp_path):
    jsonl = _corpus(tmp_path)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("path\tduration\tlabel\n" + "".join(f"audio/u{i}.wav\t{n / 16000}\t{TEXTS[i]}\n"
                                                      for i, n in enumerate(LENGTHS)))
    fair = tmp_path / "fs" / "train.tsv"
    fair.parent.mkdir()
    fair.write_text(f"{tmp_path / 'audio'}\n" + "".join(f"u{i}.wav\t{n}\n" for i, n in enumerate(LENGTHS)))
    ltr = tmp_path / "fs" / "train.ltr"
    ltr.write_text("".join(" ".join("|" if c == " " else c for c in t) + " |\n" for t in TEXTS))
    a, b, c = read_manifest(jsonl), read_manifest(tsv), read_manifest(fair, ltr)
    for x, y, z in zip(a, b, c):
        assert os.path.samefile(x.path, y.path) and os.path.samefile(x.path, z.path)
        assert x.duration == y.duration == z.duration and x.label == y.label
        assert z.label == ["|" if ch == " " else ch for ch in x.label] + ["|"]
    config = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat"))
    encode_labels(a, "ctc", config, VOCAB)
    assert a[1].label == [6, 5, 4, 7]
    bad = tmp_path / "bad.tsv"
    bad.write_text("path\tduration\naudio/u0.wav\t-1\n")
    with pytest.raises(ManifestError, match=r"bad.tsv:2: duration must be a positive"):
        read_manifest(bad)
    entries = read_manifest(jsonl)
    entries[2].label = "d"
    with pytest.raises(ManifestError, match=r"entry 2 .* not in the vocabulary: \['d'\]"):
        encode_labels(entries, "ctc", config, VOCAB)
    with pytest.raises(ManifestError, match=r"8 label lines for 9"):
        fair.write_text(fair.read_text() + "u0.wav\t1600\n")
        read_manifest(fair, ltr)


def test_class_labels_that_are_label2id_names_are_those_classes(tmp_path):
    """Names first: with numeric names sorted as strings ('0', '1', '10', '11', '2', ...) the label '10' is
    label2id['10'] = 2, not id 10; a label that is no name is an integer id below num_labels."""
    names = sorted(str(i) for i in range(12))
    config = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat", num_labels=12),
                                   label2id={n: i for i, n in enumerate(names)},
                                   id2label={i: n for i, n in enumerate(names)})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": "a.wav", "duration": 1, "label": label}) + "\n"
                                for label in ("10", 10, "2", "0")))
    for task in ("classify", "xvector"):
        entries = read_manifest(manifest)
        encode_labels(entries, task, config)
        assert [e.label for e in entries] == [2, 2, 4, 0]
        assert [config.id2label[e.label] for e in entries] == ["10", "10", "2", "0"]
    default = uf.UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat"))  # LABEL_0 ...: numbers are ids
    entries = read_manifest(manifest)
    entries[0].label = entries[1].label = "LABEL_1"
    encode_labels(entries, "classify", default)
    assert [e.label for e in entries] == [1, 1, 2, 0]
    entries[0].label = "3"
    with pytest.raises(ManifestError, match=r"entry 0 .* label 3 is outside \[0, num_labels=3\)"):
        encode_labels(entries, "classify", default)


def test_plan_batches_buckets_by_padded_seconds():
    durations = [0.1, 2.0, 0.5, 0.45, 0.3, 0.11, 0.9, 0.12, 0.31]
    plan = plan_batches(durations, 1.0, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(len(durations)))
    for b in plan:
        assert len(b) == 1 or len(b) * max(durations[i] for i in b) <= 1.0
    assert [2.0] in [[durations[i] for i in b] for b in plan]  # longer than the limit: alone
    assert plan == plan_batches(durations, 1.0, seed=1, epoch=0)
    assert any(plan_batches(durations, 1.0, seed=1, epoch=e) != plan for e in range(1, 5))


# ============================================================================================ tasks
@pytest.mark.parametrize("task,family,labels", [("ctc", "UniSpeechSat", "text"), ("classify", "UniSpeech", "ids"),
                                                ("xvector", "UniSpeechSat", "ids")])
def test_finetune_each_task(tmp_path, task, family, labels):
    model = _checkpoint(tmp_path, family)
    manifest = _corpus(tmp_path, labels)
    out = tmp_path / "run"
    assert _finetune(model, manifest, out, "--task", task, "--max-steps", "4", "--grad-accum", "2",
                     "--warmup-steps", "2") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["audio_seconds"] > 0 for r in records)
    assert [r["lr"] for r in records] == pytest.approx([2.5e-5, 5e-5, 5e-5, 2.5e-5])  # warm-up, then linear decay
    cls = getattr(uf, {"ctc": family + "ForCTC", "classify": family + "ForSequenceClassification",
                       "xvector": family + "ForXVector"}[task])
    final = cls.from_pretrained(out / "final")
    base = cls.from_pretrained(model)
    changed = [k for k, v in final.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    # trained, and the conv feature encoder stayed frozen
    assert changed and not any(re.match(r"unispeech(_sat)?\.feature_extractor\.", k) for k in changed)
    assert (out / "checkpoint-4" / "training_state.pt").is_file()
    assert ((out / "final" / "vocab.json").is_file()) == (task == "ctc")


def test_checkpoints_and_final_carry_the_preprocessor_config_the_run_used(tmp_path):
    """A checkpoint that says do_normalize false trains without normalising, and its checkpoints and final/
    say so too (without the file, the inference commands would normalise); the source's other fields are
    kept. Without a source file the run writes transformers' defaults with its own do_normalize."""
    from unispeech_fast.audio import load_model

    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path)
    source = {"do_normalize": False, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
              "padding_value": 0.0, "return_attention_mask": True, "sampling_rate": 16000, "mine": [1, 2]}
    (model / "preprocessor_config.json").write_text(json.dumps(source))
    out = tmp_path / "run"
    assert _finetune(model, manifest, out, "--task", "ctc", "--max-steps", "2", "--save-every", "1") == 0
    for name in ("checkpoint-1", "checkpoint-2", "final"):
        assert json.loads((out / name / "preprocessor_config.json").read_text()) == source, name
    assert load_model(out / "final").preprocessor_config["do_normalize"] is False
    (model / "preprocessor_config.json").unlink()
    tsv, km = _fairseq_corpus(tmp_path, "UniSpeechSat")
    for extra, normalize in (((), True), (("--no-normalize",), False)):
        out = tmp_path / f"run-{normalize}"
        assert _pretrain(model, tsv, out, "--labels", str(km), "--max-steps", "1", *extra) == 0
        for name in ("checkpoint-1", "final"):
            pre = json.loads((out / name / "preprocessor_config.json").read_text())
            assert pre["do_normalize"] is normalize and pre["sampling_rate"] == 16000
            assert pre["return_attention_mask"] is False  # a group-norm feature encoder, as transformers' default
            assert pre["feature_extractor_type"] == "Wav2Vec2FeatureExtractor"


@pytest.mark.gpu
@pytest.mark.parametrize("command,family", [("finetune", "UniSpeechSat"), ("pretrain", "UniSpeechSat"),
                                            ("pretrain", "UniSpeech")])
def test_cuda_runs_the_forward_under_bf16_autocast(tmp_path, monkeypatch, command, family):
    """``--device cuda``: every forward under CUDA bf16 autocast (no GradScaler: bf16 needs none), fp32
    weights, finite losses, and the weights move."""
    cls = getattr(uf, family + ("ForCTC" if command == "finetune" else "ForPreTraining"))
    seen = []
    forward = cls.forward

    def spy(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                     next(self.parameters()).dtype, next(self.parameters()).device.type))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)
    model = _checkpoint(tmp_path, family)
    out = tmp_path / "run"
    if command == "finetune":
        assert _finetune(model, _corpus(tmp_path), out, "--task", "ctc", "--max-steps", "3", "--device", "cuda") == 0
    else:
        tsv, labels = _fairseq_corpus(tmp_path, family)
        assert _pretrain(model, tsv, out, "--labels", str(labels), "--max-steps", "3", "--device", "cuda") == 0
    assert seen and set(seen) == {(True, torch.bfloat16, torch.float32, "cuda")}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in _weights(out / "final").values())
    final, start = (cls.from_pretrained(path).base_model.state_dict() for path in (out / "final", model))
    assert any(not torch.equal(v, start[k]) for k, v in final.items())


def test_batches_left_over_at_an_epoch_end_are_logged(tmp_path, capsys):
    """4 batches per epoch and 3 per step (accumulation 3): one batch is left and the log says so."""
    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path)
    assert _finetune(model, manifest, tmp_path / "run", "--task", "ctc", "--max-steps", "2", "--grad-accum", "3") == 0
    assert capsys.readouterr().err.count("batch(es) left unused (fewer than one step of 3)") == 1
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]


def test_an_epoch_shorter_than_one_step_is_a_usage_error(tmp_path, capsys):
    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path)
    code = _finetune(model, manifest, tmp_path / "run", "--task", "ctc", "--max-steps", "1", "--grad-accum", "5")
    assert code == 2
    assert "gives 4 batch(es) per epoch, fewer than one step needs (world_size x grad_accum = 5)" in \
        capsys.readouterr().err


def test_task_that_does_not_fit_the_checkpoint_is_a_usage_error(tmp_path, capsys):
    model = _checkpoint(tmp_path, "UniSpeech")
    assert _finetune(model, _corpus(tmp_path, "ids"), tmp_path / "run", "--task", "xvector", "--max-steps", "1") == 2
    assert "--task xvector needs model_type in ['unispeech-sat']" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--clip-norm", "nan"), ("--clip-norm", "inf"), ("--clip-norm", "-1"),
                                          ("--weight-decay", "nan"), ("--warmup-steps", "-1"), ("--save-every", "-2")])
def test_non_finite_or_negative_numbers_are_usage_errors(tmp_path, capsys, option, value):
    """--clip-norm nan turned clipping off without a word (nan > 0 is false); every such option must be a
    finite number >= 0 (0 = off for --clip-norm and --save-every)."""
    with pytest.raises(SystemExit) as info:
        _finetune(tmp_path / "base", tmp_path / "m.jsonl", tmp_path / "run", "--task", "ctc", "--max-steps", "1",
                  option, value)
    assert info.value.code == 2
    assert f"{option} must be finite and >= 0, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ============================================================================================ resume
def test_resume_is_bitwise_exact_one_process(tmp_path):
    """Stopped after step 2 and resumed: the step-5 weights equal an uninterrupted run's, bit for bit
    (dropout, LayerDrop 0.5, SpecAugment on; epochs roll over; accumulation 2)."""
    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path)
    common = ("--task", "ctc", "--max-steps", "5", "--grad-accum", "2", "--warmup-steps", "2")
    assert _finetune(model, manifest, tmp_path / "full", *common) == 0
    assert _finetune(model, manifest, tmp_path / "part", *common, "--stop-after", "2") == 0
    assert not (tmp_path / "part" / "final").exists()
    resume = str(tmp_path / "part" / "checkpoint-2")
    assert _finetune(model, manifest, tmp_path / "part", *common, "--resume", resume) == 0
    _assert_bitwise(_weights(tmp_path / "full" / "final"), _weights(tmp_path / "part" / "final"))
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in full] == [json.loads(x)["loss"] for x in part]
    # resumed from an earlier checkpoint than the last step run (as after a kill between checkpoints): the
    # rows of the steps after it are dropped, then written again, so the file reads as the uninterrupted run's
    assert _finetune(model, manifest, tmp_path / "again", *common, "--stop-after", "4", "--save-every", "2") == 0
    assert _finetune(model, manifest, tmp_path / "again", *common, "--save-every", "2",
                     "--resume", str(tmp_path / "again" / "checkpoint-2")) == 0
    again = (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(x)["step"], json.loads(x)["loss"]) for x in again] == \
        [(json.loads(x)["step"], json.loads(x)["loss"]) for x in full]
    # control: without restoring, a "resume" from the base weights is not the same run
    assert _finetune(model, manifest, tmp_path / "fresh", *common, "--stop-after", "3") == 0
    assert not torch.equal(_weights(tmp_path / "fresh" / "checkpoint-3")["lm_head.weight"],
                           _weights(tmp_path / "full" / "final")["lm_head.weight"])


def test_resume_refuses_a_changed_run(tmp_path, capsys):
    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path)
    assert _finetune(model, manifest, tmp_path / "r", "--task", "ctc", "--max-steps", "4", "--stop-after", "1") == 0
    code = _finetune(model, manifest, tmp_path / "r", "--task", "ctc", "--max-steps", "6",
                     "--resume", str(tmp_path / "r" / "checkpoint-1"))
    assert code == 2 and "max_steps=4" in capsys.readouterr().err


@pytest.mark.parametrize("changed,named", [
    (("--lr", "1e-3"), "lr=5e-05 (--lr)"), (("--no-normalize",), "normalize=True (--no-normalize"),
    (("--task", "xvector"), "head='UniSpeechSatForSequenceClassification' (--task, or the --model's model_type)"),
    (("--no-freeze-feature-encoder",), "freeze_feature_encoder=True (--[no-]freeze-feature-encoder)"),
    (("--warmup-steps", "1"), "warmup_steps=0 (--warmup-steps)"),
    (("--weight-decay", "0"), "weight_decay=0.01 (--weight-decay)"), (("--clip-norm", "0"), "clip_norm=1.0")])
def test_resume_refuses_changed_options_naming_them(tmp_path, capsys, changed, named):
    """A changed --lr was ignored (the scheduler state keeps the old one), --no-normalize applied without a
    word, another task or freezing failed in torch's 'parameter group doesn't match': each is refused."""
    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path, "ids")
    common = ("--task", "classify", "--max-steps", "3")
    assert _finetune(model, manifest, tmp_path / "r", *common, "--stop-after", "1") == 0
    capsys.readouterr()
    args = (*common, *changed) if changed[0] != "--task" else ("--max-steps", "3", *changed)
    assert _finetune(model, manifest, tmp_path / "r", *args, "--resume", str(tmp_path / "r" / "checkpoint-1")) == 2
    err = capsys.readouterr().err
    assert "the checkpoint was written with " + named in err and "an exact resume needs the same value" in err
    assert not (tmp_path / "r" / "checkpoint-3").exists()


def test_resume_refuses_a_checkpoint_that_does_not_record_a_setting(tmp_path, capsys):
    from unispeech_fast.train.loop import STATE_FILE

    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path, "ids")
    common = ("--task", "classify", "--max-steps", "3")
    assert _finetune(model, manifest, tmp_path / "r", *common, "--stop-after", "1") == 0
    path = tmp_path / "r" / "checkpoint-1" / STATE_FILE
    state = torch.load(path, weights_only=True)
    del state["lr"]
    torch.save(state, path)
    capsys.readouterr()
    assert _finetune(model, manifest, tmp_path / "r", *common, "--resume", str(path.parent)) == 2
    assert "does not record lr (--lr; written by an earlier version)" in capsys.readouterr().err


def test_a_new_run_refuses_an_output_dir_that_holds_files(tmp_path, capsys):
    """Without --resume, finetune and pretrain refuse a non-empty --output-dir (exit 2, naming it and saying
    what to do) and change nothing in it; an empty directory is taken; a file is no directory."""
    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path)
    out = tmp_path / "run"
    out.mkdir()  # empty: fine
    assert _finetune(model, manifest, out, "--task", "ctc", "--max-steps", "2", "--save-every", "1") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _finetune(model, manifest, out, "--task", "ctc", "--max-steps", "2", "--lr", "1e-3") == 2
    err = capsys.readouterr().err
    assert f"--output-dir {out} is not empty" in err and "--resume" in err and "another --output-dir" in err
    tsv, km = _fairseq_corpus(tmp_path, "UniSpeechSat")
    assert _pretrain(model, tsv, out, "--labels", str(km), "--max-steps", "1") == 2
    assert f"--output-dir {out} is not empty" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("the user's own line\n")
    assert _finetune(model, manifest, mine, "--task", "ctc", "--max-steps", "1") == 2
    assert (mine / "metrics.jsonl").read_text() == "the user's own line\n" and len(list(mine.iterdir())) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    capsys.readouterr()
    assert _finetune(model, manifest, manifest, "--task", "ctc", "--max-steps", "1") == 2
    assert f"--output-dir {manifest}: exists and is not a directory" in capsys.readouterr().err
    assert _finetune(model, manifest, manifest / "run", "--task", "ctc", "--max-steps", "1") == 2
    assert f"--output-dir {manifest / 'run'}: cannot create it" in capsys.readouterr().err


def test_resume_from_a_missing_directory_is_a_usage_error(tmp_path, capsys):
    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path)
    missing = tmp_path / "nonexist"
    assert _finetune(model, manifest, tmp_path / "run", "--task", "ctc", "--max-steps", "1", "--resume",
                     str(missing)) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: --resume {missing}: no such directory (give a checkpoint-N directory of the run)"


def test_sigint_stops_with_one_line_and_exit_130_keeping_what_was_written(tmp_path, capsys, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt, here raised by the 9th file read, in step 3 of 1-2 files each) ends the
    run with exit 130 and one error line naming the last step and checkpoint; its checkpoints, metrics
    and failures.json stay, and --resume continues from the checkpoint."""
    from unispeech_fast.train import loop

    model = _checkpoint(tmp_path)
    manifest = _corpus(tmp_path, extra=[("broken.wav", None, "ab")])
    reads, load_example = [0], loop.load_example

    def interrupting(*args, **kwargs):
        reads[0] += 1
        if reads[0] == 9:
            raise KeyboardInterrupt
        return load_example(*args, **kwargs)

    monkeypatch.setattr(loop, "load_example", interrupting)
    out = tmp_path / "run"
    assert _finetune(model, manifest, out, "--task", "ctc", "--max-steps", "6", "--save-every", "2",
                     "--grad-accum", "2") == 130
    err = capsys.readouterr().err.strip().splitlines()
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert 1 <= steps < 6
    last = out / f"checkpoint-{steps // 2 * 2}"
    assert err[-1] == f"error: interrupted after step {steps}; last checkpoint: {last} (continue with --resume {last})"
    assert not any("Traceback" in line for line in err)
    assert last.is_dir() and not (out / "final").exists()
    assert [pathlib.Path(f["input"]).name for f in json.loads((out / "failures.json").read_text())["failed"]] == \
        ["broken.wav"]
    monkeypatch.setattr(loop, "load_example", load_example)
    assert _finetune(model, manifest, out, "--task", "ctc", "--max-steps", "6", "--save-every", "2",
                     "--grad-accum", "2", "--resume", str(last)) == 0
    assert (out / "final").is_dir()


def _torchrun(tmp_path, out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "unispeech_fast", "finetune", "--output-dir", str(out),
           "--max-batch-seconds", "0.45", "--quiet", "--seed", "3", *args]
    # cwd outside the repository: its top-level kernels/ folder must not shadow the PyPI package
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_resume_is_bitwise_exact_two_gloo_ranks(tmp_path):
    model, manifest = _checkpoint(tmp_path), _corpus(tmp_path)
    common = ("--model", str(model), "--manifest", str(manifest), "--task", "ctc", "--max-steps", "3")
    _torchrun(tmp_path, tmp_path / "full", *common)
    # 8 files of 0.1-0.25 s in 0.45 s batches: 4 batches, 2 per step (one per rank), so step 3 is in epoch 1
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 0, 1]
    _torchrun(tmp_path, tmp_path / "part", *common, "--stop-after", "1")
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoint-1").glob("rng-rank*.pt")) == \
        ["rng-rank0.pt", "rng-rank1.pt"]
    _torchrun(tmp_path, tmp_path / "part", *common, "--resume", str(tmp_path / "part" / "checkpoint-1"))
    _assert_bitwise(_weights(tmp_path / "full" / "final"), _weights(tmp_path / "part" / "final"))


# ============================================================================================ failures
def test_bad_audio_file_is_skipped_and_listed(tmp_path, capsys):
    model = _checkpoint(tmp_path)
    manifest = _corpus(tmp_path, extra=[("broken.wav", None, "ab")])
    out = tmp_path / "run"
    assert _finetune(model, manifest, out, "--task", "ctc", "--max-steps", "2") == 0
    report = json.loads((out / "failures.json").read_text())
    assert report["total"] == 9 and report["succeeded"] == 8
    assert [pathlib.Path(f["input"]).name for f in report["failed"]] == ["broken.wav"]
    assert "cannot read audio" in report["failed"][0]["reason"]
    assert "broken.wav" in capsys.readouterr().err


def test_file_failing_at_read_time_is_skipped_even_alone_in_its_batch(tmp_path):
    """NaN samples pass the header check and fail when read; the file is longer than --max-batch-seconds,
    so its batch holds nothing else and the rank runs a silent stand-in with a zero loss."""
    model = _checkpoint(tmp_path)
    manifest = _corpus(tmp_path, extra=[("nan.wav", np.full(8000, np.nan, dtype=np.float32), "ab")])
    out = tmp_path / "run"
    assert _finetune(model, manifest, out, "--task", "ctc", "--max-steps", "5") == 0
    report = json.loads((out / "failures.json").read_text())
    assert [pathlib.Path(f["input"]).name for f in report["failed"]] == ["nan.wav"]
    assert "NaN or infinite samples" in report["failed"][0]["reason"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(math.isfinite(r["loss"]) for r in records)


def test_nan_loss_stops_with_step_and_files_keeping_last_checkpoint(tmp_path, capsys):
    """An injected NaN: a float WAV of 3e38 samples (finite, so it reads) overflows the model."""
    model = _checkpoint(tmp_path)
    poison = np.full(2000, 3e38, dtype=np.float32)
    manifest = _corpus(tmp_path, extra=[("poison.wav", poison, "ab"), ("broken.wav", None, "ab")])
    out = tmp_path / "run"
    code = _finetune(model, manifest, out, "--task", "ctc", "--max-steps", "40", "--save-every", "1",
                     "--no-normalize")
    err = capsys.readouterr().err
    assert code == 1, err
    line = [x for x in err.splitlines() if x.startswith("error: step ")][0]
    step = int(line.split()[2].rstrip(":"))
    assert "poison.wav" in line and "not finite" in line
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert checkpoints == list(range(1, step))  # nothing written for the bad step or after it
    assert f"last good checkpoint: {out / f'checkpoint-{step - 1}'}" in line
    if checkpoints:
        assert all(torch.isfinite(v).all() for v in _weights(out / f"checkpoint-{step - 1}").values())
    assert not (out / "final").exists()
    # the files skipped before the stop are listed all the same
    report = json.loads((out / "failures.json").read_text())
    assert [pathlib.Path(f["input"]).name for f in report["failed"]] == ["broken.wav"]


# ============================================================================================ pretrain
def _fairseq_corpus(tmp_path, family, extra_km=()) -> tuple[pathlib.Path, pathlib.Path]:
    """The authors' format: a fairseq .tsv over the WAVs of ``_corpus`` plus a parallel label file
    (.km frame cluster ids for UniSpeech-SAT, one per model frame; .phn phones for UniSpeech).
    ``extra_km``: (name, samples, label count) rows appended with random audio."""
    from unispeech_fast.training import _frames

    _corpus(tmp_path)
    rng = np.random.default_rng(1)
    config = getattr(uf, family + "Config")(**tiny_config_kwargs(family))
    rows, labels = [], []
    for i, n in enumerate(LENGTHS):
        rows.append(f"u{i}.wav\t{n}\n")
        if family == "UniSpeechSat":
            labels.append(" ".join(str(v) for v in rng.integers(0, config.num_clusters, _frames(config, n))) + "\n")
        else:
            labels.append(" ".join(TEXTS[i].replace(" ", "")) + "\n")
    for name, n, count in extra_km:
        sf.write(tmp_path / "audio" / name, (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        rows.append(f"{name}\t{n}\n")
        labels.append(" ".join(str(v) for v in rng.integers(0, config.num_clusters, count)) + "\n")
    tsv = tmp_path / "pt" / "train.tsv"
    tsv.parent.mkdir(exist_ok=True)
    tsv.write_text(f"{tmp_path / 'audio'}\n" + "".join(rows))
    label_file = tsv.with_suffix(".km" if family == "UniSpeechSat" else ".phn")
    label_file.write_text("".join(labels))
    return tsv, label_file


def _pretrain(model, manifest, out, *args, quiet=True) -> int:
    return cli.main(["pretrain", "--model", str(model), "--manifest", str(manifest), "--output-dir", str(out),
                     "--max-batch-seconds", "0.45", "--seed", "3", *(["--quiet"] if quiet else []), *args])


@pytest.mark.parametrize("family,with_labels", [("UniSpeechSat", True), ("UniSpeech", True), ("UniSpeech", False)])
def test_pretrain_trains_each_family(tmp_path, family, with_labels, capsys):
    from unispeech_fast.train.pretrain import gumbel_temperature

    model = _checkpoint(tmp_path, family)
    tsv, labels = _fairseq_corpus(tmp_path, family)
    out = tmp_path / "run"
    schedule = ("2", "0.5", "0.8")  # a fast decay, so the floor is reached within the run
    args = ["--max-steps", "8", "--gumbel-temperature", *schedule] + (["--labels", str(labels)] if with_labels else [])
    assert _pretrain(model, tsv, out, *args, quiet=False) == 0
    err = capsys.readouterr().err
    assert "ppl=" in err  # the progress bar shows the codebook perplexity
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) and r["perplexity"] > 0 for r in records)
    assert [r["gumbel_temperature"] for r in records] == [gumbel_temperature(s, (2, 0.5, 0.8)) for s in range(1, 9)]
    assert records[0]["gumbel_temperature"] == 2 and records[-1]["gumbel_temperature"] == 0.5
    cls = getattr(uf, family + "ForPreTraining")
    final = cls.from_pretrained(out / "final")
    torch.manual_seed(3)  # the run's --seed: the new pre-training parameters start from the same draws
    base = cls.from_pretrained(model)
    changed = {k for k, v in final.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    prefix = "unispeech_sat" if family == "UniSpeechSat" else "unispeech"
    assert f"{prefix}.encoder.layers.0.attention.q_proj.weight" in changed
    assert f"{prefix}.feature_extractor.conv_layers.0.conv.weight" in changed  # not frozen when pre-training
    assert "quantizer.codevectors" in changed
    if family == "UniSpeech":
        assert ("ctc_proj.weight" in changed) == with_labels  # the CTC branch trains only with phone labels
        assert (out / "final" / "vocab.json").is_file() == with_labels


@pytest.mark.parametrize("family", ["UniSpeechSat", "UniSpeech"])
def test_pretrain_passes_per_sample_noise_seeds(tmp_path, monkeypatch, capsys, family):
    """The run's Gumbel noise and replace mix follow the seeding rule (README "Training"): every batch
    reaches the head with one ``noise_seeds`` entry per sample, and a resume refuses a checkpoint whose
    settings lack them (one written when the noise came from the global RNG)."""
    cls = getattr(uf, family + "ForPreTraining")
    seen = []
    forward = cls.forward

    def spy(self, *args, **kwargs):
        seeds = kwargs.get("noise_seeds")
        seen.append(None if seeds is None else (tuple(seeds.shape), kwargs["input_values"].shape[0]))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)
    model = _checkpoint(tmp_path, family)
    tsv, labels = _fairseq_corpus(tmp_path, family)
    out = tmp_path / "run"
    common = ("--labels", str(labels), "--max-steps", "3")
    assert _pretrain(model, tsv, out, *common, "--save-every", "1") == 0
    assert seen and all(s is not None and s[0] == (s[1],) for s in seen), seen
    from unispeech_fast.train.loop import STATE_FILE

    state_path = next(out.glob(f"**/{STATE_FILE}"))
    state = torch.load(state_path, weights_only=True)
    assert state["objective"]["noise_seeds"] is True
    del state["objective"]["noise_seeds"]
    torch.save(state, state_path)
    capsys.readouterr()
    assert _pretrain(model, tsv, tmp_path / "resumed", *common, "--resume", str(state_path.parent)) == 2
    assert "objective=" in capsys.readouterr().err


def test_gumbel_schedule_is_set_on_the_model_before_each_step(tmp_path):
    from unispeech_fast.train.pretrain import PretrainObjective, gumbel_temperature

    model = uf.UniSpeechForPreTraining(uf.UniSpeechConfig(**tiny_config_kwargs("UniSpeech", mask_time_prob=0.3)))
    objective = PretrainObjective(model, seed=0)  # the authors' defaults: max 2, min 0.5, decay 0.999995
    assert objective.start_step(model, 1) == {"gumbel_temperature": 2.0} and model.quantizer.temperature == 2.0
    objective.start_step(model, 1001)
    assert model.quantizer.temperature == 2.0 * 0.999995 ** 1000 == gumbel_temperature(1001, (2.0, 0.5, 0.999995))
    objective.start_step(model, 10 ** 6)
    assert model.quantizer.temperature == 0.5
    with pytest.raises(ValueError, match="mask_time_prob"):
        PretrainObjective(uf.UniSpeechForPreTraining(uf.UniSpeechConfig(**tiny_config_kwargs(
            "UniSpeech", mask_time_prob=0.0))), 0)


def test_pretrain_draws_follow_the_batch_seed_and_avoid_padding():
    """Negatives and utterance mixing come from a generator of (seed, step, plan index): the same
    triple draws the same, another index draws otherwise; padding is never a negative nor mixed."""
    from unispeech_fast.train.pretrain import PretrainObjective
    from unispeech_fast.training import SpeechDataCollator

    def batch(model):
        waves = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (1600, 2400, 3200)]
        return SpeechDataCollator(model)([{"input_values": w, "mask_seed": k} for k, w in enumerate(waves)])

    torch.manual_seed(0)
    model = uf.UniSpeechForPreTraining(uf.UniSpeechConfig(**tiny_config_kwargs("UniSpeech", mask_time_prob=0.3)))
    objective = PretrainObjective(model, seed=5)
    a, b, c = (objective.prepare(batch(model), 4, i) for i in (7, 7, 8))
    assert torch.equal(a["sampled_negative_indices"], b["sampled_negative_indices"])
    assert not torch.equal(a["sampled_negative_indices"], c["sampled_negative_indices"])
    mask, frames = a["mask_time_indices"], a["mask_time_indices"].shape[1]
    valid = model._get_feature_vector_attention_mask(frames, a["attention_mask"]).reshape(-1)
    picked = a["sampled_negative_indices"][mask]
    assert picked.numel() and valid[picked].all() and mask.reshape(-1)[picked].all()

    sat = uf.UniSpeechSatForPreTraining(uf.UniSpeechSatConfig(**tiny_config_kwargs(
        "UniSpeechSat", mask_time_prob=0.3, proj_codevector_dim=24)))
    objective = PretrainObjective(sat, seed=5, mixing_prob=1.0)
    raw = batch(sat)
    x, y, z = (objective.prepare(batch(sat), 4, i) for i in (7, 7, 8))
    assert torch.equal(x["input_values"], y["input_values"]) and not torch.equal(x["input_values"], z["input_values"])
    assert not torch.equal(x["input_values"], raw["input_values"])  # mixed
    assert (x["input_values"][raw["attention_mask"] == 0] == 0).all()  # padding stays silent


def test_pretrain_resume_is_bitwise_exact_one_process(tmp_path):
    """UniSpeech-SAT with utterance mixing, Gumbel noise, dropout, LayerDrop and masks; accumulation 2."""
    model = _checkpoint(tmp_path)
    tsv, km = _fairseq_corpus(tmp_path, "UniSpeechSat")
    common = ("--labels", str(km), "--max-steps", "4", "--grad-accum", "2", "--warmup-steps", "1")
    assert _pretrain(model, tsv, tmp_path / "full", *common) == 0
    assert _pretrain(model, tsv, tmp_path / "part", *common, "--stop-after", "2") == 0
    assert _pretrain(model, tsv, tmp_path / "part", *common, "--resume", str(tmp_path / "part" / "checkpoint-2")) == 0
    _assert_bitwise(_weights(tmp_path / "full" / "final"), _weights(tmp_path / "part" / "final"))
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["perplexity"]) for r in full] == [(r["loss"], r["perplexity"]) for r in part]
    # a resume with another schedule would not continue the same run: refused
    changed = (*common, "--gumbel-temperature", "2", "0.5", "0.9")
    assert _pretrain(model, tsv, tmp_path / "part", *changed, "--resume", str(tmp_path / "part" / "checkpoint-2")) == 2
    # control: another seed is another run (the draws matter)
    assert _pretrain(model, tsv, tmp_path / "other", *common, "--seed", "4") == 0
    assert not torch.equal(_weights(tmp_path / "other" / "final")["project_hid.weight"],
                           _weights(tmp_path / "full" / "final")["project_hid.weight"])


def test_pretrain_resume_is_bitwise_exact_two_gloo_ranks(tmp_path):
    model = _checkpoint(tmp_path, "UniSpeech")
    tsv, phn = _fairseq_corpus(tmp_path, "UniSpeech")
    common = ("--model", str(model), "--manifest", str(tsv), "--labels", str(phn), "--max-steps", "3")

    def run(out, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "unispeech_fast", "pretrain", "--output-dir", str(out),
               "--max-batch-seconds", "0.45", "--quiet", "--seed", "3", *common, *args]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "full")
    run(tmp_path / "part", "--stop-after", "1")
    run(tmp_path / "part", "--resume", str(tmp_path / "part" / "checkpoint-1"))
    _assert_bitwise(_weights(tmp_path / "full" / "final"), _weights(tmp_path / "part" / "final"))
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 0, 1] and all("perplexity" in r for r in records)


def test_pretrain_skips_and_lists_bad_files(tmp_path):
    """A corrupt WAV (header check) and a file whose cluster labels do not fit its frames (load time)."""
    model = _checkpoint(tmp_path)
    tsv, km = _fairseq_corpus(tmp_path, "UniSpeechSat", extra_km=[("shifted.wav", 2000, 60)])
    (tmp_path / "audio" / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wav")
    tsv.write_text(tsv.read_text() + "broken.wav\t3000\n")
    km.write_text(km.read_text() + "1 2 3\n")
    out = tmp_path / "run"
    assert _pretrain(model, tsv, out, "--labels", str(km), "--max-steps", "6") == 0
    report = json.loads((out / "failures.json").read_text())
    assert report["total"] == 10 and report["succeeded"] == 8
    reasons = {pathlib.Path(f["input"]).name: f["reason"] for f in report["failed"]}
    assert set(reasons) == {"broken.wav", "shifted.wav"}
    assert "60 cluster labels for 29 frames" in reasons["shifted.wav"]


def test_pretrain_nan_loss_stops_with_step_and_files(tmp_path, capsys):
    model = _checkpoint(tmp_path, "UniSpeech")
    tsv, _ = _fairseq_corpus(tmp_path, "UniSpeech")
    sf.write(tmp_path / "audio" / "poison.wav", np.full(2000, 3e38, dtype=np.float32), 16000, subtype="FLOAT")
    tsv.write_text(tsv.read_text() + "poison.wav\t2000\n")
    out = tmp_path / "run"
    code = _pretrain(model, tsv, out, "--max-steps", "40", "--save-every", "1", "--no-normalize")
    err = capsys.readouterr().err
    assert code == 1, err
    line = [x for x in err.splitlines() if x.startswith("error: step ")][0]
    step = int(line.split()[2].rstrip(":"))
    assert "poison.wav" in line and "not finite" in line
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == list(range(1, step))
    assert not (out / "final").exists()


def test_pretrain_usage_errors(tmp_path, capsys):
    sat = _checkpoint(tmp_path / "s")
    tsv, km = _fairseq_corpus(tmp_path, "UniSpeechSat")
    assert _pretrain(sat, tsv, tmp_path / "a", "--max-steps", "1") == 2
    assert "predicts k-means cluster ids: give --labels" in capsys.readouterr().err
    unmasked = _checkpoint(tmp_path / "u", mask_time_prob=0.0)
    assert _pretrain(unmasked, tsv, tmp_path / "b", "--labels", str(km), "--max-steps", "1") == 2
    assert "mask_time_prob=0.0" in capsys.readouterr().err
    us = _checkpoint(tmp_path / "v", "UniSpeech")
    assert _pretrain(us, tsv, tmp_path / "c", "--max-steps", "1", "--mixing-prob", "0.3") == 2
    assert "UniSpeech has none" in capsys.readouterr().err
    bad_km = km.with_name("bad.km")
    bad_km.write_text(km.read_text().replace("\n", " 99\n", 1))
    assert _pretrain(sat, tsv, tmp_path / "d", "--labels", str(bad_km), "--max-steps", "1") == 2
    assert "cluster ids [99] outside [0, num_clusters=7)" in capsys.readouterr().err
