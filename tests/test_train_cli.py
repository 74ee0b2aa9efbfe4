"""``unispeech-fast finetune``: manifests, bucketing, each task, exact resume (1 process and 2 gloo
ranks under torchrun), bad files skipped and listed, a NaN loss stopping the run (tiny models, CPU)."""

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
    """A tiny backbone checkpoint (dropout, LayerDrop and SpecAugment on) with vocab.json."""
    kw = tiny_config_kwargs(family, **{"mask_time_prob": 0.3, "mask_time_length": 2, "layerdrop": 0.5,
                                       "hidden_dropout": 0.1, "vocab_size": len(VOCAB), **overrides})
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
