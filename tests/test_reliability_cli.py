"""Reliability of the command line (issue 10): no lost work, no overwritten inputs, clear errors.

Every file command (``embed``, ``transcribe``, ``diarize``, ``verify-speakers``) is run in process
through :func:`unispeech_fast.audio_cli.main` on tiny random checkpoints written with our own
``save_pretrained`` and on WAV/FLAC files written with soundfile. Each test names its issue item.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import write_noise, write_tiny_checkpoints, write_truncated_flac
from unispeech_fast import (
    UniSpeechSatForAudioFrameClassification,
    UniSpeechSatForCTC,
    UniSpeechSatForXVector,
    audio,
    audio_cli,
    cli,
    dispatch,
)
from unispeech_fast.configuration import ConfigError

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("rel_ckpts"), {
        "ctc": UniSpeechSatForCTC, "frames": UniSpeechSatForAudioFrameClassification, "xvector": UniSpeechSatForXVector,
    }, 99)


@pytest.fixture
def files(tmp_path):
    """good1.wav, good2.wav, good3.flac and trunc.flac (its header promises more than it holds)."""
    rng = np.random.default_rng(5)
    out = {}
    for name, n, ext in (("good1", 3200, "wav"), ("good2", 2600, "wav"), ("good3", 3000, "flac")):
        out[name] = str(tmp_path / f"{name}.{ext}")
        write_noise(out[name], n, rng)
    out["trunc"] = str(tmp_path / "trunc.flac")
    write_truncated_flac(out["trunc"], 20000, rng)
    return out


def _cli(argv, capsys):
    code = audio_cli.main([*argv, "--quiet"])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


def _no_model_run(monkeypatch):
    """Fail the test if the model would run: proves a check happened up front."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although the command should have stopped before it")

    monkeypatch.setattr(audio.tasks, "_run", refuse)  # the runner every task calls


# Every command with the option(s) that name an output file, and the checkpoint it needs.
FILE_OUTPUTS = [
    ("embed", "ctc", "-o", ".safetensors"),
    ("transcribe", "ctc", "-o", ".tsv"),
    ("diarize", "frames", "-o", ".rttm"),
    ("verify-speakers", "xvector", "-o", ".npy"),
    ("verify-speakers", "xvector", "--embeddings", ".npy"),
]


# ============================================================================================ item 8
@pytest.mark.parametrize("command, ckpt, flag, _", FILE_OUTPUTS)
def test_an_output_that_is_an_input_is_refused(command, ckpt, flag, _, ckpts, files, capsys, monkeypatch):
    _no_model_run(monkeypatch)
    before = open(files["good1"], "rb").read()
    for spelling in (files["good1"], os.path.join(os.path.dirname(files["good1"]), ".", "good1.wav")):
        code, _, err = _cli([command, files["good1"], files["good2"], "--model", ckpts[ckpt], flag, spelling,
                             "--overwrite"], capsys)
        assert code == cli.EXIT_USAGE and err.startswith("error: ") and "is one of the inputs" in err
    assert open(files["good1"], "rb").read() == before


@pytest.mark.parametrize("command, ckpt, flag, _", FILE_OUTPUTS)
def test_an_output_that_is_a_checkpoint_file_is_refused(command, ckpt, flag, _, ckpts, files, capsys, monkeypatch):
    _no_model_run(monkeypatch)
    config_file = os.path.join(ckpts[ckpt], "config.json")
    before = open(config_file, "rb").read()
    code, _, err = _cli([command, files["good1"], files["good2"], "--model", ckpts[ckpt], flag, config_file,
                         "--overwrite"], capsys)
    assert code == cli.EXIT_USAGE and "is one of the inputs" in err
    assert open(config_file, "rb").read() == before


@pytest.mark.parametrize("command, ckpt, flag, suffix", FILE_OUTPUTS)
def test_an_output_that_is_a_hard_link_to_an_input_is_refused(command, ckpt, flag, suffix, ckpts, files, tmp_path,
                                                              capsys, monkeypatch):
    """A hard link has its own realpath: the file identity is compared too (review2 item 2)."""
    _no_model_run(monkeypatch)
    for source in (files["good1"], os.path.join(ckpts[ckpt], "config.json")):
        before = open(source, "rb").read()
        link = tmp_path / f"link{suffix}"
        if link.exists():
            link.unlink()
        os.link(source, link)
        code, _, err = _cli([command, files["good1"], files["good2"], "--model", ckpts[ckpt], flag, str(link),
                             "--overwrite"], capsys)
        assert code == cli.EXIT_USAGE and f"is one of the inputs ({source})" in err, err
        assert open(source, "rb").read() == before


@pytest.mark.parametrize("command, ckpt, flag, suffix", FILE_OUTPUTS)
def test_an_existing_output_is_replaced_only_with_overwrite(command, ckpt, flag, suffix, ckpts, files, tmp_path,
                                                             capsys):
    target = tmp_path / f"old{suffix}"
    target.write_bytes(b"keep me")
    argv = [command, files["good1"], files["good2"], "--model", ckpts[ckpt], flag, str(target)]
    code, _, err = _cli(argv, capsys)
    assert code == cli.EXIT_USAGE and "already exists; pass --overwrite" in err
    assert target.read_bytes() == b"keep me"
    code, _, err = _cli([*argv, "--overwrite"], capsys)
    assert code == cli.EXIT_OK, err
    assert target.read_bytes() != b"keep me"


def test_embed_directory_refuses_to_replace_an_existing_npy(ckpts, files, tmp_path, capsys):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "good2.npy").write_bytes(b"keep me")
    argv = ["embed", files["good1"], files["good2"], "--model", ckpts["ctc"], "-o", str(out)]
    code, _, err = _cli(argv, capsys)
    assert code == cli.EXIT_USAGE and "good2.npy already exists" in err
    assert (out / "good2.npy").read_bytes() == b"keep me" and not (out / "good1.npy").exists()
    code, _, err = _cli([*argv, "--overwrite"], capsys)
    assert code == cli.EXIT_OK, err
    assert np.load(out / "good2.npy").shape == (16,)


def test_safetensors_outputs_get_the_umask_mode(ckpts, files, tmp_path, capsys):
    """embed -o x.safetensors and verify-speakers --embeddings x.safetensors were created 0600 (review2 item 6)."""
    old = os.umask(0o022)
    try:
        code, _, err = _cli(["embed", files["good1"], "--model", ckpts["ctc"], "-o", str(tmp_path / "e.safetensors")],
                            capsys)
        assert code == cli.EXIT_OK, err
        code, _, err = _cli(["verify-speakers", files["good1"], files["good2"], "--model", ckpts["xvector"],
                             "--embeddings", str(tmp_path / "v.safetensors")], capsys)
        assert code == cli.EXIT_OK, err
    finally:
        os.umask(old)
    for name in ("e.safetensors", "v.safetensors"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o644), name


def test_embed_refuses_an_output_directory_named_like_a_file(ckpts, files, tmp_path, capsys, monkeypatch):
    """``embed -o x.npy`` made a directory named x.npy (review2 item 7): refused, saying what -o may be."""
    _no_model_run(monkeypatch)
    for argv in ([files["good1"]], ["--manifest", os.path.dirname(files["good1"])]):
        code, _, err = _cli(["embed", *argv, "--model", ckpts["ctc"], "-o", str(tmp_path / "x.npy")], capsys)
        assert code == cli.EXIT_USAGE and "would become a directory of that name" in err, err
        assert ("one .safetensors file" in err) if argv[0] != "--manifest" else ("output is a directory" in err)
        assert not (tmp_path / "x.npy").exists()
    monkeypatch.undo()
    code, _, err = _cli(["embed", files["good1"], "--model", ckpts["ctc"], "-o", str(tmp_path / "x.npy") + os.sep],
                        capsys)
    assert code == cli.EXIT_OK and (tmp_path / "x.npy" / "good1.npy").is_file(), err


def test_embed_creates_its_directory_when_every_input_fails(ckpts, files, tmp_path, capsys):
    """The failures list goes into the output directory, so it is created even with no result (review2 item 4)."""
    out = tmp_path / "new" / "emb"
    code, _, err = _cli(["embed", files["trunc"], "--model", ckpts["ctc"], "-o", str(out) + os.sep], capsys)
    assert code == cli.EXIT_FAILURE and "1 of 1 input(s) failed" in err and "no results were written" in err, err
    record = json.loads((out / "failures.json").read_text())
    assert [f["input"] for f in record["failed"]] == [files["trunc"]] and record["succeeded"] == 0
    assert os.listdir(out) == ["failures.json"]


@pytest.mark.parametrize("command, ckpt", [("embed", "ctc"), ("transcribe", "ctc"), ("diarize", "frames"),
                                           ("verify-speakers", "xvector")])
def test_the_same_input_twice_is_refused_by_every_command(command, ckpt, ckpts, files, tmp_path, capsys,
                                                         monkeypatch):
    _no_model_run(monkeypatch)
    again = os.path.join(os.path.dirname(files["good1"]), ".", os.path.basename(files["good1"]))
    code, _, err = _cli([command, files["good1"], files["good2"], again, "--model", ckpts[ckpt],
                         *(["-o", str(tmp_path / "e")] if command == "embed" else [])], capsys)
    assert code == cli.EXIT_USAGE and "the same AUDIO file is given twice" in err


# ============================================================================================ item 3
@pytest.mark.parametrize("names", [("d1/talk.wav", "d2/talk.wav"), ("d1/a b.wav", "d2/a_b.flac")])
def test_diarize_refuses_recordings_that_would_share_an_rttm_id(names, ckpts, tmp_path, capsys, monkeypatch):
    paths = []
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        sf.write(str(path), np.zeros(3000, dtype=np.float32), 16000)
        paths.append(str(path))
    _no_model_run(monkeypatch)
    code, _, err = _cli(["diarize", *paths, "--model", ckpts["frames"]], capsys)
    assert code == cli.EXIT_USAGE and paths[0] in err and paths[1] in err and "RTTM" in err


def test_diarize_rttm_ids_name_each_file(ckpts, files, capsys):
    code, out, err = _cli(["diarize", files["good1"], files["good2"], "--model", ckpts["frames"],
                           "--threshold", "0"], capsys)
    assert code == cli.EXIT_OK, err
    assert {line.split()[1] for line in out.splitlines()} == {"good1", "good2"}


# ============================================================================================ item 9
def _failures_file(path):
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return {e["input"]: e["reason"] for e in record["failed"]}, record


def test_embed_writes_every_good_result_and_lists_the_bad_file(ckpts, files, tmp_path, capsys):
    out = tmp_path / "out"
    inputs = [files["good1"], files["good2"], files["trunc"]]
    code, _, err = _cli(["embed", *inputs, "--model", ckpts["ctc"], "-o", str(out)], capsys)
    assert code == cli.EXIT_FAILURE
    assert "trunc.flac" in err and "truncated" in err and "1 of 3 input(s) failed" in err
    assert sorted(os.listdir(out)) == ["failures.json", "good1.npy", "good2.npy"]
    failed, record = _failures_file(out / "failures.json")
    assert list(failed) == [files["trunc"]] and "truncated" in failed[files["trunc"]]
    assert record["succeeded"] == 2 and record["total"] == 3
    model = audio.load_model(ckpts["ctc"])
    np.testing.assert_allclose(np.load(out / "good2.npy"), audio.embed(model, [files["good2"]])[0], atol=2e-5)


@pytest.mark.parametrize("command, ckpt, suffix", [("embed", "ctc", ".safetensors"), ("transcribe", "ctc", ".tsv"),
                                                   ("diarize", "frames", ".rttm"),
                                                   ("verify-speakers", "xvector", ".npy")])
def test_every_command_keeps_good_results_beside_a_failures_list(command, ckpt, suffix, ckpts, files, tmp_path,
                                                                 capsys):
    output = str(tmp_path / f"result{suffix}")
    inputs = [files["good1"], files["trunc"], files["good2"], files["good3"], str(tmp_path / "missing.wav")]
    extra = ["--threshold", "0"] if command == "diarize" else []
    code, stdout, err = _cli([command, *inputs, "--model", ckpts[ckpt], "-o", output, *extra], capsys)
    assert code == cli.EXIT_FAILURE
    for bad in (files["trunc"], inputs[-1]):
        assert f"error: {bad}:" in err
    failed, _ = _failures_file(output + ".failures.json")
    assert set(failed) == {files["trunc"], inputs[-1]}
    good = [files["good1"], files["good2"], files["good3"]]
    if command == "embed":
        from safetensors.numpy import load_file

        assert set(load_file(output)) == set(good)
    elif command == "transcribe":
        assert [line.split("\t")[0] for line in open(output).read().splitlines()] == good
    elif command == "diarize":
        assert {line.split()[1] for line in open(output).read().splitlines()} == {"good1", "good2", "good3"}
    else:
        assert np.load(output).shape == (3, 3)
        assert len(stdout.splitlines()) == 3


def test_no_failures_file_when_everything_worked_and_a_stale_one_is_removed_with_overwrite(ckpts, files, tmp_path,
                                                                                          capsys):
    output = tmp_path / "t.tsv"
    stale = tmp_path / "t.tsv.failures.json"
    stale.write_text("{}")
    argv = ["transcribe", files["good1"], "--model", ckpts["ctc"], "-o", str(output)]
    code, _, err = _cli(argv, capsys)
    assert code == cli.EXIT_USAGE and "t.tsv.failures.json already exists" in err
    code, _, err = _cli([*argv, "--overwrite"], capsys)
    assert code == cli.EXIT_OK, err
    assert not stale.exists()


def test_explicit_failures_path_and_stdout_outputs(ckpts, files, tmp_path, capsys):
    listing = tmp_path / "bad.json"
    code, out, err = _cli(["transcribe", files["good1"], files["trunc"], "--model", ckpts["ctc"],
                           "--failures", str(listing)], capsys)
    assert code == cli.EXIT_FAILURE and out.startswith(files["good1"] + "\t")
    assert list(_failures_file(listing)[0]) == [files["trunc"]]


def test_verify_speakers_with_one_usable_file_says_so(ckpts, files, tmp_path, capsys):
    code, _, err = _cli(["verify-speakers", files["good1"], files["trunc"], "--model", ckpts["xvector"]], capsys)
    assert code == cli.EXIT_FAILURE and "fewer than two usable" in err and "no results were written" in err


# ============================================================================================ item 10
@pytest.mark.parametrize("command, ckpt, flag, suffix", FILE_OUTPUTS + [("embed", "ctc", "-o", "")])
def test_unwritable_outputs_are_found_before_the_model_runs(command, ckpt, flag, suffix, ckpts, files, tmp_path,
                                                           capsys, monkeypatch):
    _no_model_run(monkeypatch)
    regular = tmp_path / "plain.txt"
    regular.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    as_dir = tmp_path / f"isdir{suffix or '.d'}"
    as_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(locked) else real_access(p, mode))
    cases = [
        (str(regular / f"out{suffix}"), "is not a directory"),  # a path under a regular file
        (str(tmp_path / "nope" / f"out{suffix}"), "does not exist" if suffix else None),
        (str(locked / f"out{suffix}"), "is not writable"),
    ]
    if suffix:
        cases.append((str(as_dir), "is a directory"))
    for target, message in cases:
        if message is None:  # embed creates a missing output directory: nothing to refuse
            continue
        code, _, err = _cli([command, files["good1"], files["good2"], "--model", ckpts[ckpt], flag, target], capsys)
        assert code == cli.EXIT_USAGE, (target, err)
        assert err.startswith("error: ") and message in err, err


def test_a_write_error_after_the_run_is_an_error_line(ckpts, files, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    code, _, err = _cli(["embed", files["good1"], "--model", ckpts["ctc"], "-o", str(tmp_path / "e")], capsys)
    assert code == cli.EXIT_FAILURE and "error: cannot write --output" in err and "No space left" in err


def test_verify_mode_mismatch_in_the_cli_is_an_error_line(ckpts, files, tmp_path, capsys, monkeypatch):
    def mismatch(*args, **kwargs):
        raise dispatch.VerificationError("linear on backend 'cpp' disagrees with the eager reference")

    monkeypatch.setattr(audio, "embed", mismatch)
    code, _, err = _cli(["embed", files["good1"], "--model", ckpts["ctc"], "-o", str(tmp_path / "e")], capsys)
    assert code == cli.EXIT_FAILURE and err.startswith("error: verify mode: linear on backend 'cpp'")


def test_verify_mode_mismatch_in_demo_is_an_error_line(capsys, monkeypatch):
    from unispeech_fast import UniSpeechSatModel

    def mismatch(self, *args, **kwargs):
        raise dispatch.VerificationError("attention on backend 'triton' disagrees with the eager reference")

    monkeypatch.setattr(UniSpeechSatModel, "forward", mismatch)
    code = cli.main(["demo", "--model", "tiny", "--seconds", "0.1", "--runs", "1"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILURE and "error: verify mode: attention on backend 'triton'" in err


# ============================================================================================ item 11
@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "abc"])
def test_max_batch_seconds_usage_errors(value, ckpts, files, capsys):
    with pytest.raises(SystemExit) as exc:
        audio_cli.main(["transcribe", files["good1"], "--model", ckpts["ctc"], "--max-batch-seconds", value])
    assert exc.value.code == cli.EXIT_USAGE
    assert "--max-batch-seconds" in capsys.readouterr().err


def test_tiny_max_batch_seconds_runs(ckpts, files, capsys):
    argv = ["transcribe", files["good1"], files["good2"], "--model", ckpts["ctc"]]
    code, tiny, err = _cli([*argv, "--max-batch-seconds", "0.00001"], capsys)
    assert code == cli.EXIT_OK, err
    assert tiny == _cli(argv, capsys)[1]


# ============================================================================================ item 12
def test_bench_out_without_matplotlib_stops_before_measuring(tmp_path, capsys, monkeypatch):
    import importlib.util

    from unispeech_fast.bench import cli as bench_cli
    from unispeech_fast.bench import harness

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(harness, "run_suite", lambda *a, **k: pytest.fail("benchmarks ran before the check"))
    code = bench_cli.main(["--quick", "--op", "attention", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert 'pip install "unispeech_fast[bench]"' in err and "--no-plots" in err


def test_bench_writes_results_before_plotting(tmp_path, capsys, monkeypatch):
    from unispeech_fast.bench import cli as bench_cli
    from unispeech_fast.bench import report

    out = tmp_path / "b"

    def plot(records, out_dir):
        assert (out / "results.json").is_file() and (out / "results.csv").is_file()
        raise RuntimeError("plotting broke")

    monkeypatch.setattr(report, "plot", plot)
    with pytest.raises(RuntimeError, match="plotting broke"):
        bench_cli.main(["--quick", "--op", "attention", "--provider", "eager", "--out", str(out),
                        "--warmup", "0", "--reps", "1"])
    assert json.loads((out / "results.json").read_text())


def test_bench_refuses_existing_results_before_measuring(tmp_path, capsys, monkeypatch):
    """``bench --out DIR`` replaced a results.json it did not create (review2 item 5): refused up front."""
    from unispeech_fast.bench import cli as bench_cli
    from unispeech_fast.bench import harness

    out = tmp_path / "b"
    out.mkdir()
    argv = ["--quick", "--op", "attention", "--provider", "eager", "--out", str(out), "--warmup", "0", "--reps", "1"]
    real = harness.run_suite
    monkeypatch.setattr(harness, "run_suite", lambda *a, **k: pytest.fail("benchmarks ran before the check"))
    for name in ("results.json", "results.csv", "attention_float32.png"):
        (out / name).write_text("mine")
        code = bench_cli.main(argv)
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE and str(out / name) in err and "--overwrite" in err, err
        assert (out / name).read_text() == "mine"
        (out / name).unlink()
    (out / "results.json").write_text("mine")
    monkeypatch.setattr(harness, "run_suite", real)
    assert bench_cli.main([*argv, "--no-plots", "--overwrite"]) == cli.EXIT_OK
    assert json.loads((out / "results.json").read_text())


# ============================================================================================ item 13
@pytest.mark.parametrize("field, value", [("dtype", "int8"), ("dtype", "float8_e4m3fn"), ("torch_dtype", "int8"),
                                          ("torch_dtype", "float8_e5m2"), ("dtype", "complex64"), ("dtype", 16)])
def test_config_json_dtype_errors_name_the_file_and_the_field(field, value, ckpts, tmp_path, capsys):
    import shutil

    directory = tmp_path / "ckpt"
    shutil.copytree(ckpts["ctc"], directory)
    config_file = directory / "config.json"
    data = json.loads(config_file.read_text())
    data.pop("dtype", None)
    data.pop("torch_dtype", None)
    data[field] = value
    config_file.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as exc:
        UniSpeechSatForCTC.from_pretrained(directory)
    message = str(exc.value)
    assert str(config_file) in message and f"{field} must name a dtype" in message and repr(value) in message
    code = audio_cli.main(["transcribe", str(directory / "x.wav"), "--model", str(directory)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILURE and str(config_file) in err and field in err


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, "float8_e5m2", "int32"])
def test_from_pretrained_rejects_dtypes_the_models_cannot_run(dtype, ckpts):
    with pytest.raises(ValueError, match="dtype must be 'auto', None or one of the dtypes the models run in"):
        UniSpeechSatForCTC.from_pretrained(ckpts["ctc"], dtype=dtype)


# ============================================================================================ item 15
@pytest.fixture
def fake_cpp_attention(monkeypatch):
    """A 'cpp' attention whose output the test chooses (the real one, if any, is put back after)."""
    from unispeech_fast.ops import attention_ref

    monkeypatch.setattr(dispatch.selection, "backend_reasons", lambda name, device: [])
    previous = dispatch._REGISTRY["attention"].get("cpp")
    spoil = {}

    def fake(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None, need_weights=False):
        out, w = attention_ref(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights)
        return spoil["fn"](out), w

    dispatch.register("attention", "cpp")(fake)
    yield spoil
    dispatch._unregister("attention", "cpp")
    if previous is not None:
        dispatch._REGISTRY["attention"]["cpp"] = previous


def _nan_at_0(out):
    out = out.clone(memory_format=torch.contiguous_format)
    out.view(-1)[0] = float("nan")
    return out


def _inf_at_0(out):
    out = out.clone(memory_format=torch.contiguous_format)
    out.view(-1)[0] = float("inf")
    return out


@pytest.mark.parametrize("spoil, message", [
    (_nan_at_0, r"non-finite values the eager reference does not \(1 NaN where the reference is not NaN"),
    (_inf_at_0, r"non-finite values the eager reference does not \(1 infinite value"),
    (lambda out: out.to(torch.float64), r"output 0 has dtype torch\.float64, the eager reference torch\.float32"),
    (lambda out: out[:, :-1], r"output 0 has shape \(2, 6, 2, 4\), the eager reference \(2, 7, 2, 4\)"),
])
def test_verify_mode_names_nan_inf_dtype_and_shape_mismatches(spoil, message, fake_cpp_attention):
    import unispeech_fast as uf
    from unispeech_fast.ops import attention

    fake_cpp_attention["fn"] = spoil
    q, k, v = (torch.randn(2, 7, 2, 4) for _ in range(3))
    with uf.backend("cpp"), uf.verify(), pytest.raises(uf.VerificationError, match=message) as exc:
        attention(q, k, v)
    assert "max abs error inf" not in str(exc.value)


def test_verify_mode_accepts_matching_non_finite_values():
    """NaN and infinities where the reference has the same ones are not differences."""
    impl = dispatch._REGISTRY["attention"]["eager"]
    ref = torch.randn(3, 5)
    ref[0, 0], ref[1, 1], ref[2, 2] = float("nan"), float("inf"), -float("inf")
    out = ref.clone()
    out[0, 1] += 1e-6
    dispatch._compare("attention", impl, out, ref, {"atol": None, "rtol": None})
    out[1, 1] = -float("inf")
    with pytest.raises(dispatch.VerificationError, match="1 infinite value"):
        dispatch._compare("attention", impl, out, ref, {"atol": None, "rtol": None})
