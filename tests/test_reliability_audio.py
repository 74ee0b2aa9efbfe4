"""Reliability of the audio API (issue 10): threads, bad inputs, layouts and resampling memory.

Tiny random checkpoints (the conftest config, layer-norm feature encoder) and files written with
soundfile; nothing is downloaded. Each test names the issue item it guards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import LAYER_NORM, tiny_config_kwargs
from unispeech_fast import (
    UniSpeechSatConfig,
    UniSpeechSatForAudioFrameClassification,
    UniSpeechSatForCTC,
    UniSpeechSatForXVector,
    audio,
)


def _model(cls, **extra):
    torch.manual_seed(7)
    model = cls(UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat", **LAYER_NORM, **extra))).eval()
    with torch.no_grad():  # spread the random heads so results vary between inputs
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] in (32, 3, 8):
                p.mul_(8.0)
    return model


def _waves(lengths, seed=0):
    g = np.random.default_rng(seed)
    return [(0.1 * g.standard_normal(n)).astype(np.float32) for n in lengths]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_audio")
    rng = np.random.default_rng(1)
    out = {}
    for name, n in (("good1", 3200), ("good2", 2600)):
        out[name] = str(root / f"{name}.wav")
        sf.write(out[name], (0.1 * rng.standard_normal(n)).astype(np.float32), 16000, subtype="FLOAT")
    full = str(root / "full.flac")
    sf.write(full, (0.1 * rng.standard_normal(20000)).astype(np.float32), 16000)
    data = open(full, "rb").read()
    out["trunc"] = str(root / "trunc.flac")
    with open(out["trunc"], "wb") as f:  # the header still promises 20000 frames
        f.write(data[: len(data) // 2])
    return out


# ============================================================================================ item 2: threads
def _in_threads(fn, n_threads=4, calls=3):
    results, errors = [], []
    barrier = threading.Barrier(n_threads)

    def worker():
        try:
            barrier.wait()
            for _ in range(calls):
                results.append(fn())
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("task", ["xvectors", "embed", "transcribe", "diarize"])
def test_concurrent_calls_on_one_model_give_the_single_thread_results(task):
    cls = {"xvectors": UniSpeechSatForXVector, "embed": UniSpeechSatForCTC,
           "transcribe": UniSpeechSatForCTC, "diarize": UniSpeechSatForAudioFrameClassification}[task]
    model = _model(cls)
    waves = _waves([4000, 3700, 3400, 3100])  # one padded batch: the xvector pooling depends on the lengths
    vocab = {i: chr(ord("a") + i % 26) for i in range(32)}
    calls = {
        "xvectors": lambda: audio.xvectors(model, waves),
        "embed": lambda: np.stack(audio.embed(model, waves)),
        "transcribe": lambda: audio.transcribe(model, waves, vocab=vocab),
        "diarize": lambda: audio.frame_probabilities(model, waves),
    }
    single = calls[task]()
    config_before = model.config.to_dict()
    for got in _in_threads(calls[task]):
        if task == "transcribe":
            assert got == single
        elif task == "diarize":
            for a, b in zip(got, single):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        else:
            np.testing.assert_allclose(got, single, rtol=0, atol=1e-6)
    assert model.config.to_dict() == config_before
    assert not hasattr(model.config, "tdnn_lengths_use_dilation")


@pytest.mark.parametrize("task", ["xvectors", "embed"])
def test_an_inference_call_writes_nothing_to_the_model_or_its_config(task, monkeypatch):
    """Deterministic form of the thread test: any write to the config, or any hook registered on a
    module, during the call fails it."""
    model = _model(UniSpeechSatForXVector)
    waves = _waves([4000, 3500])
    expected = audio.xvectors(model, waves) if task == "xvectors" else audio.embed(model, waves)
    config_type = type(model.config)

    def no_write(self, name, value):
        raise AssertionError(f"the inference call wrote config.{name}")

    def no_hooks(self, *args, **kwargs):
        raise AssertionError("the inference call registered a hook on the model")

    monkeypatch.setattr(config_type, "__setattr__", no_write)
    monkeypatch.setattr(config_type, "__delattr__", lambda self, name: no_write(self, name, None))
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", no_hooks)
    monkeypatch.setattr(torch.nn.Module, "register_forward_pre_hook", no_hooks)
    got = audio.xvectors(model, waves) if task == "xvectors" else audio.embed(model, waves)
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))


def test_xvector_padded_pooling_still_counts_the_dilation():
    """The per-call switch replaces the config write: padded inputs still pool their own frames."""
    model = _model(UniSpeechSatForXVector)
    waves = _waves([4000, 3000])
    batched = audio.xvectors(model, waves)
    single = np.stack([audio.xvectors(model, [w])[0] for w in waves])
    np.testing.assert_allclose(batched, single, rtol=0, atol=2e-5)


# ============================================================================================ item 4: finiteness
def test_float64_waveform_beyond_float32_range_is_an_error_not_nan():
    model = _model(UniSpeechSatForCTC)
    wave = np.zeros(4000)
    wave[100] = 1e39  # finite in float64, inf in float32
    with pytest.raises(audio.AudioError, match="waveform 0.*beyond float32's range"):
        audio.embed(model, [wave])
    failures = {}
    out = audio.embed(model, [wave, _waves([4000])[0]], failures=failures)
    assert out[0] is None and out[1] is not None and np.isfinite(out[1]).all()
    assert list(failures) == ["waveform 0"]


def test_samples_beyond_the_model_dtype_range_are_an_error():
    """The check runs after the cast to the model's dtype: 1e5 is finite in float32, inf in float16."""
    model = _model(UniSpeechSatForCTC).to(torch.float16)
    wave = _waves([4000])[0].copy()
    wave[10] = 1e5
    with pytest.raises(audio.AudioError, match=r"waveform 0: samples beyond the range of the model's dtype "
                                               r"torch\.float16"):
        audio.embed(model, [wave], normalize=False)


# ============================================================================================ item 14: layout
@pytest.mark.parametrize("frames, channels", [(48000, 2), (16000, 1), (5000, 6)])
def test_frames_by_channels_array_is_named_as_a_layout_mistake(frames, channels):
    model = _model(UniSpeechSatForCTC)
    wave = np.zeros((frames, channels), dtype=np.float32)  # what soundfile.read returns
    with pytest.raises(ValueError, match=r"looks like \[samples, channels\].*wave\.T"):
        audio.embed(model, [wave])
    wave = (0.1 * np.random.default_rng(0).standard_normal((channels, 4000))).astype(np.float32)
    assert audio.embed(model, [wave])[0].shape == (16,)  # [channels, samples] still works


# ============================================================================================ item 9 (API)
def test_failures_dict_keeps_every_good_result_and_finds_truncation_before_the_model_runs(files):
    model = _model(UniSpeechSatForCTC)
    failures: dict[str, str] = {}
    seen_at_first_forward = []
    model.base_model.register_forward_pre_hook(lambda *_: seen_at_first_forward.append(dict(failures)))
    inputs = [files["good1"], files["trunc"], files["good2"], files["good1"] + ".missing"]
    out = audio.embed(model, inputs, failures=failures)
    assert out[1] is None and out[3] is None
    assert set(failures) == {files["trunc"], files["good1"] + ".missing"}
    assert "truncated" in failures[files["trunc"]] and "no such file" in failures[files["good1"] + ".missing"]
    assert set(seen_at_first_forward[0]) == set(failures)  # both found before the first batch ran
    for k in (0, 2):
        np.testing.assert_allclose(out[k], audio.embed(model, [inputs[k]])[0], rtol=0, atol=2e-5)
    with pytest.raises(audio.AudioError, match="trunc.flac.*truncated"):  # default: raise, naming the file
        audio.embed(model, inputs)


def test_too_short_input_is_recorded_not_fatal():
    model = _model(UniSpeechSatForCTC)
    failures: dict[str, str] = {}
    out = audio.embed(model, _waves([4000, 50, 3000]), failures=failures)
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert "too short" in failures["waveform 1"]


# ============================================================================================ item 11 (API)
@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "60"])
def test_max_batch_seconds_is_validated(bad):
    model = _model(UniSpeechSatForCTC)
    with pytest.raises(ValueError, match="max_batch_seconds must be a positive, finite number"):
        audio.embed(model, _waves([4000]), max_batch_seconds=bad)


def test_tiny_max_batch_seconds_runs_each_file_alone():
    model = _model(UniSpeechSatForCTC)
    waves = _waves([4000, 3000, 3500])
    np.testing.assert_allclose(np.stack(audio.embed(model, waves, max_batch_seconds=1e-5)),
                               np.stack(audio.embed(model, waves)), rtol=0, atol=2e-5)


# ============================================================================================ item 16: resampling
def _tones(rate, seconds, freqs):
    t = np.arange(int(rate * seconds)) / rate
    return sum(np.sin(2 * np.pi * f * t + k) for k, f in enumerate(freqs)) / len(freqs)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 2001, 16001])
def test_resample_matches_band_limited_tones(rate):
    nyquist = min(rate, 16000) / 2
    freqs = [0.1 * nyquist, 0.45 * nyquist, 0.8 * nyquist]
    got = audio.resample(_tones(rate, 1.0, freqs), rate, 16000)
    want = _tones(16000, 1.0, freqs)
    assert got.shape == (-(-rate * 16000 // rate) if rate == 16000 else -(-int(rate * 1.0) * 16000 // rate),)
    edge = 1000  # the ends see the zeros outside the signal
    assert np.abs(got[edge:-edge] - want[edge:len(got) - edge]).max() < 5e-5


def test_resample_uses_bounded_memory_for_odd_rates(tmp_path):
    """16001 Hz -> 16 kHz needed a 2 GiB float64 polyphase conv weight (2001 Hz: 261 MiB, kept in a
    cache of 16); now each output gathers its own taps. The address space is capped at what the
    process has plus 512 MiB, so an allocation beyond that fails the run."""
    code = (
        "import resource, numpy as np\n"
        "from unispeech_fast import audio\n"
        "x = np.random.default_rng(0).standard_normal(16001 * 3).astype(np.float32)\n"
        "audio.resample(x[:1000], 44100, 16000)\n"
        "vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))\n"
        "for rate in (16001, 2001, 16001 * 3):\n"
        "    y = audio.resample(x, rate, 16000)\n"
        "    assert np.isfinite(y).all() and y.shape == (-(-x.size * 16000 // rate),)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_resample_chunked_path_equals_the_filter_bank_path(monkeypatch):
    """The taps computed per chunk (banks too large to cache) are the cached bank's, bit for bit."""
    x = np.random.default_rng(3).standard_normal(5000)
    with_bank = audio.resample(x, 2001, 16000)
    monkeypatch.setattr(audio.resampling, "_BANK_MAX_TAPS", 0)
    monkeypatch.setattr(audio.resampling, "_CHUNK_TAPS", 1000)
    np.testing.assert_array_equal(audio.resample(x, 2001, 16000), with_bank)
