"""Corpus jobs (issue 13 section 3): ``embed|transcribe|diarize --manifest FILE|DIR --output DIR``.

Manifests (fairseq .tsv, .jsonl, a directory), the duration-balanced split across ranks, resume
after deleted outputs or a killed run, refusal of a directory holding another job, and the
2-process run under ``torchrun`` (gloo on loopback) equal to the 1-process run, with one failures
list gathered from both ranks. Tiny random checkpoints and generated WAV files; seconds each.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_noise, write_tiny_checkpoints, write_truncated_flac
from unispeech_fast import (
    UniSpeechSatForAudioFrameClassification,
    UniSpeechSatForCTC,
    audio,
    audio_cli,
    cli,
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("corpus_ckpts"),
                                  {"ctc": UniSpeechSatForCTC, "frames": UniSpeechSatForAudioFrameClassification}, 13)


@pytest.fixture
def corpus(tmp_path):
    """corpus/ with 9 WAV files of different lengths in two folders, one truncated FLAC; a .tsv and a
    .jsonl manifest listing them all."""
    rng = np.random.default_rng(3)
    root = tmp_path / "corpus"
    (root / "spk1").mkdir(parents=True)
    (root / "spk2").mkdir()
    rels, sizes = [], []
    for k in range(9):
        rel = f"spk{1 + k % 2}/utt{k}.wav"
        n = 1600 + 400 * k
        write_noise(root / rel, n, rng)
        rels.append(rel)
        sizes.append(n)
    write_truncated_flac(root / "spk2" / "broken.flac", 20000, rng)
    rels.append("spk2/broken.flac")
    sizes.append(20000)
    tsv = tmp_path / "train.tsv"
    tsv.write_text(str(root) + "\n" + "".join(f"{r}\t{n}\n" for r, n in zip(rels, sizes)))
    jsonl = root / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"path": r, "duration": n / 16000}) + "\n" for r, n in zip(rels, sizes)))
    return dict(root=str(root), rels=rels, tsv=str(tsv), jsonl=str(jsonl))


def _run(*argv):
    return audio_cli.main([str(a) for a in argv])


def _results(out, suffix):
    found = {}
    for root, dirs, names in os.walk(out):
        dirs[:] = [d for d in dirs if d != ".corpus"]
        for name in names:
            if name.endswith(suffix):
                path = os.path.join(root, name)
                found[os.path.relpath(path, out)] = open(path, "rb").read()
    return found


EXACT = ("--exact", "--threads", "1", "--quiet")


# ============================================================================================ manifests
def test_manifest_formats_agree(corpus):
    base_t, tsv = audio_cli.read_manifest(corpus["tsv"])
    base_j, jsonl = audio_cli.read_manifest(corpus["jsonl"])
    base_d, directory = audio_cli.read_manifest(corpus["root"])
    assert base_t == base_j == base_d == corpus["root"]
    assert [p for p, _ in tsv] == [os.path.join(corpus["root"], r) for r in corpus["rels"]]
    assert [p for p, _ in jsonl] == [p for p, _ in tsv]
    assert [d for _, d in jsonl] == pytest.approx([d for _, d in tsv])
    assert sorted(p for p, _ in directory) == sorted(p for p, _ in tsv)  # list.jsonl is not audio
    durations = dict(directory)
    assert durations[os.path.join(corpus["root"], "spk1/utt0.wav")] == pytest.approx(0.1)


@pytest.mark.parametrize("name, text, where", [
    ("a.tsv", "/root\nx.wav\n", "line 2"),
    ("a.tsv", "/root\nx.wav\tmany\n", "line 2: num_samples must be an integer"),
    ("a.jsonl", '{"path": "x.wav", "duration": 1}\n{"path": "y.wav"}\n', "line 2"),
    ("a.jsonl", "not json\n", "line 1: not JSON"),
    ("a.txt", "x\n", "expected a .tsv or .jsonl"),
])
def test_bad_manifest_is_a_usage_error_naming_the_line(tmp_path, ckpts, capsys, name, text, where):
    (tmp_path / name).write_text(text)
    assert _run("embed", "--manifest", tmp_path / name, "--model", ckpts["ctc"], "-o", tmp_path / "o") \
        == cli.EXIT_USAGE
    assert where in capsys.readouterr().err


def test_split_by_duration_is_balanced_and_deterministic():
    secs = [5.0, 1.0, 4.0, 4.0, 2.0, 3.0, 3.0, 1.0]
    shares = audio_cli.split_by_duration(secs, 2)
    assert shares == audio_cli.split_by_duration(secs, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(secs)))
    loads = [sum(secs[i] for i in s) for s in shares]
    assert loads == [12.0, 11.0]  # longest first onto the least-loaded rank: 5,3,3,1 / 4,4,2,1
    assert audio_cli.split_by_duration(secs, 1) == [list(range(len(secs)))]
    assert audio_cli.split_by_duration([1.0], 3) == [[0], [], []]


def test_usage_errors(corpus, ckpts, tmp_path, capsys):
    model = ckpts["ctc"]
    assert _run("embed", "--model", model, "-o", tmp_path / "o") == cli.EXIT_USAGE
    assert "give AUDIO files or --manifest" in capsys.readouterr().err
    assert _run("embed", "x.wav", "--manifest", corpus["tsv"], "--model", model, "-o", tmp_path / "o") \
        == cli.EXIT_USAGE
    assert "not both" in capsys.readouterr().err
    assert _run("transcribe", "--manifest", corpus["tsv"], "--model", model) == cli.EXIT_USAGE
    assert "needs --output DIR" in capsys.readouterr().err
    assert _run("embed", "--manifest", corpus["tsv"], "--model", model, "-o", tmp_path / "x.safetensors") \
        == cli.EXIT_USAGE
    assert _run("embed", "--manifest", corpus["tsv"], "--model", model, "-o", tmp_path / "o",
                "--failures", tmp_path / "f.json") == cli.EXIT_USAGE
    assert _run("embed", "--manifest", corpus["root"], "--model", model, "-o", corpus["root"]) == cli.EXIT_USAGE
    assert "lies inside it" in capsys.readouterr().err
    (tmp_path / "a.tsv").write_text(f"{tmp_path}\n../elsewhere.wav\t100\n")
    assert _run("embed", "--manifest", tmp_path / "a.tsv", "--model", model, "-o", tmp_path / "o") \
        == cli.EXIT_USAGE
    assert "is not below" in capsys.readouterr().err


# ============================================================================================ one process
def test_corpus_embed_equals_file_mode_and_lists_failures(corpus, ckpts, tmp_path, capsys):
    out = tmp_path / "emb"
    assert _run("embed", "--manifest", corpus["tsv"], "--model", ckpts["ctc"], "-o", out, *EXACT) \
        == cli.EXIT_FAILURE
    assert "1 of 10 input(s) failed" in capsys.readouterr().err
    good = [r for r in corpus["rels"] if r.endswith(".wav")]
    assert sorted(_results(out, ".npy")) == sorted(r[:-4] + ".npy" for r in good)
    ref = audio.embed(audio.load_model(ckpts["ctc"]), [os.path.join(corpus["root"], r) for r in good],
                                exact=True)
    for rel, vec in zip(good, ref):
        np.testing.assert_array_equal(np.load(out / (rel[:-4] + ".npy")), vec)
    record = json.loads((out / "failures.json").read_text())
    assert record["total"] == 10 and record["succeeded"] == 9
    assert [f["input"] for f in record["failed"]] == [os.path.join(corpus["root"], "spk2/broken.flac")]


def test_two_unreadable_files_without_exact_are_named_and_skipped(corpus, ckpts, tmp_path, capsys):
    """Without --exact, two files whose header cannot be read (length 0 in the plan) once crashed the
    batch planning (ZeroDivisionError): no results, no failures list (review2 item 1)."""
    tsv = tmp_path / "two_bad.tsv"
    tsv.write_text(open(corpus["tsv"]).read() + "spk1/missing.wav\t5000\nspk2/gone.wav\t3000\n")
    out = tmp_path / "emb"
    assert _run("embed", "--manifest", tsv, "--model", ckpts["ctc"], "-o", out, "--threads", "1", "--quiet") \
        == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "3 of 12 input(s) failed" in err and "Traceback" not in err
    assert len(_results(out, ".npy")) == 9
    record = json.loads((out / "failures.json").read_text())
    bad = ("spk2/broken.flac", "spk1/missing.wav", "spk2/gone.wav")
    assert [f["input"] for f in record["failed"]] == [os.path.join(corpus["root"], r) for r in bad]


def test_rerun_skips_done_and_redoes_deleted_outputs(corpus, ckpts, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    args = ("embed", "--manifest", corpus["jsonl"], "--model", ckpts["ctc"], "-o", out, *EXACT)
    _run(*args)
    before = _results(out, ".npy")
    os.remove(out / "spk1" / "utt2.npy")
    os.remove(out / "spk2" / "utt5.npy")
    seen = []
    real = audio.embed

    def counting(model, paths, **kw):
        seen.extend(os.path.relpath(p, corpus["root"]) for p in paths)
        return real(model, paths, **kw)

    monkeypatch.setattr(audio, "embed", counting)
    assert _run(*args) == cli.EXIT_FAILURE  # the broken file is retried and fails again
    assert sorted(seen) == ["spk1/utt2.wav", "spk2/broken.flac", "spk2/utt5.wav"]
    assert _results(out, ".npy") == before


def test_killed_run_resumes_to_the_same_outputs(corpus, ckpts, tmp_path, monkeypatch):
    files = [r for r in corpus["rels"] if r.endswith(".wav")]
    (tmp_path / "good.tsv").write_text(corpus["root"] + "\n" + "".join(f"{r}\t{1600}\n" for r in files))
    args = ("transcribe", "--manifest", tmp_path / "good.tsv", "--model", ckpts["ctc"], *EXACT)
    assert _run(*args, "-o", tmp_path / "whole") == cli.EXIT_OK
    real = audio.transcribe
    calls = []

    def killed(model, paths, **kw):
        calls.append(paths)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the job is killed after three batches
        return real(model, paths, **kw)

    monkeypatch.setattr(audio, "transcribe", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(*args, "-o", tmp_path / "part")
    assert len(_results(tmp_path / "part", ".txt")) == 3
    monkeypatch.setattr(audio, "transcribe", real)
    assert _run(*args, "-o", tmp_path / "part") == cli.EXIT_OK
    assert _results(tmp_path / "part", ".txt") == _results(tmp_path / "whole", ".txt")
    texts = real(audio.load_model(ckpts["ctc"]), [os.path.join(corpus["root"], r) for r in files], exact=True,
                 vocab=os.path.join(ckpts["ctc"], "vocab.json"))
    for rel, text in zip(files, texts):
        assert (tmp_path / "whole" / (rel[:-4] + ".txt")).read_text() == text + "\n"
    assert not (tmp_path / "whole" / "failures.json").exists()


def test_directory_of_another_job_is_refused_unless_overwrite(corpus, ckpts, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = ("embed", "--manifest", corpus["root"], "--model", ckpts["ctc"], "-o", out, *EXACT)
    assert _run(*base) == cli.EXIT_USAGE
    assert "holds no corpus job" in capsys.readouterr().err
    assert _run(*base, "--overwrite") == cli.EXIT_FAILURE  # runs (the broken file fails)
    assert _run(*base, "--pool", "frames") == cli.EXIT_USAGE  # other results: not mixed in silently
    assert "differs in pool" in capsys.readouterr().err
    first = _results(out, ".npy")
    assert _run(*base, "--pool", "frames", "--overwrite") == cli.EXIT_FAILURE
    redone = _results(out, ".npy")
    assert redone.keys() == first.keys() and all(redone[k] != first[k] for k in first)
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_after_the_checkpoint_changed_in_place_is_refused(corpus, ckpts, tmp_path, capsys):
    """job.json fingerprints the checkpoint's files: weights rewritten in place (same path) or a changed
    config.json refuse a resume naming the file, as does a job.json without the fingerprint (review2 item 3)."""
    model = tmp_path / "ckpt"
    shutil.copytree(ckpts["ctc"], model)
    out = tmp_path / "emb"
    args = ("embed", "--manifest", corpus["root"], "--model", model, "-o", out, *EXACT)
    assert _run(*args) == cli.EXIT_FAILURE  # the broken file
    assert _run(*args) == cli.EXIT_FAILURE  # an unchanged checkpoint resumes
    capsys.readouterr()
    job = json.loads((out / ".corpus" / "job.json").read_text())
    assert set(job["model_files"]) == {"config.json", "model.safetensors", "vocab.json"}
    torch.manual_seed(5)  # other weights, written in place
    reloaded = audio.load_model(str(model))
    for p in reloaded.parameters():
        p.data.normal_()
    reloaded.save_pretrained(model)
    assert _run(*args) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "differs in model_files" in err and "model.safetensors (changed)" in err, err
    assert "config.json" not in err.split("started:")[1]
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")  # the config alone counts
    assert _run(*args) == cli.EXIT_USAGE
    assert "config.json (changed), model.safetensors (changed)" in capsys.readouterr().err
    assert _run(*args, "--overwrite") == cli.EXIT_FAILURE  # --overwrite starts over with the new checkpoint
    assert _run(*args) == cli.EXIT_FAILURE
    job = json.loads((out / ".corpus" / "job.json").read_text())
    del job["model_files"]  # as an older version wrote it
    (out / ".corpus" / "job.json").write_text(json.dumps(job))
    assert _run(*args) == cli.EXIT_USAGE
    assert "does not record the checkpoint's files (model_files" in capsys.readouterr().err


def test_diarize_corpus_writes_rttm_per_file(corpus, ckpts, tmp_path):
    out = tmp_path / "rttm"
    assert _run("diarize", "--manifest", corpus["root"], "--model", ckpts["frames"], "-o", out, *EXACT) \
        == cli.EXIT_FAILURE
    model = audio.load_model(ckpts["frames"])
    rel = "spk2/utt3.wav"
    segs = audio.diarize(model, [os.path.join(corpus["root"], rel)], exact=True)[0]
    expected = "".join(line + "\n" for line in audio.rttm_lines("spk2/utt3", segs))
    assert (out / "spk2" / "utt3.rttm").read_text() == expected
    assert len(_results(out, ".rttm")) == 9


# ============================================================================================ torchrun
def test_two_ranks_under_torchrun_equal_one_process(corpus, ckpts, tmp_path, capsys):
    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-P", "-m", "torch.distributed.run"]  # what the `torchrun` script runs
    # a second bad input (listed, missing) that the split gives to the other rank than broken.flac
    tsv = tmp_path / "two.tsv"
    tsv.write_text(open(corpus["tsv"]).read() + "spk1/missing.wav\t5000\n")
    _, entries = audio_cli.read_manifest(str(tsv))
    shares = audio_cli.split_by_duration([d for _, d in entries], 2)
    bad = [os.path.join(corpus["root"], r) for r in ("spk2/broken.flac", "spk1/missing.wav")]
    ranks = [next(r for r, share in enumerate(shares) if any(entries[i][0] == p for i in share)) for p in bad]
    assert sorted(ranks) == [0, 1]
    args = ["embed", "--manifest", tsv, "--model", ckpts["ctc"], *EXACT]
    assert _run(*args, "-o", tmp_path / "one") == cli.EXIT_FAILURE
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([*torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                          "-m", "unispeech_fast.audio_cli", *map(str, args), "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert two.returncode != 0, two.stderr  # a worker's exit 1 (the broken file): torchrun reports failure
    assert "2 of 11 input(s) failed" in two.stderr, two.stderr
    done = sorted(os.listdir(tmp_path / "two" / ".corpus"))
    assert done == ["done.rank0-of-2.txt", "done.rank1-of-2.txt", "job.json"]
    lists = [open(tmp_path / "two" / ".corpus" / d).read().split() for d in done[:2]]
    assert lists[0] and lists[1] and not set(lists[0]) & set(lists[1])  # each rank did its own share
    assert _results(tmp_path / "two", ".npy") == _results(tmp_path / "one", ".npy")
    assert len(_results(tmp_path / "one", ".npy")) == 9
    assert (tmp_path / "two" / "failures.json").read_text() == (tmp_path / "one" / "failures.json").read_text()
    record = json.loads((tmp_path / "two" / "failures.json").read_text())  # one list, both ranks' failures
    assert [f["input"] for f in record["failed"]] == bad  # in manifest order
    assert (record["succeeded"], record["total"]) == (9, 11)
    # a 1-process rerun of the 2-rank job finds everything done (the done lists of any world size count)
    assert _run(*args, "-o", tmp_path / "two") == cli.EXIT_FAILURE
    assert "2 of 11" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "two" / ".corpus" / "done.rank0-of-1.txt") or \
        open(tmp_path / "two" / ".corpus" / "done.rank0-of-1.txt").read() == ""


def test_file_mode_under_torchrun_is_refused(corpus, ckpts, tmp_path, monkeypatch, capsys):
    """AUDIO files under torchrun would be run and written by every rank: only corpus jobs split."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    wav = os.path.join(corpus["root"], corpus["rels"][0])
    assert _run("transcribe", wav, "--model", ckpts["ctc"], "-o", tmp_path / "t.txt") == cli.EXIT_USAGE
    assert "give the inputs as --manifest" in capsys.readouterr().err
    assert not (tmp_path / "t.txt").exists()
