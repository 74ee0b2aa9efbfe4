"""Reading audio inputs: file headers and samples (``soundfile``), waveforms mixed down to mono (with
the ``[samples, channels]`` layout check), normalisation, and the per-input sources of a run.

Inputs are file paths (WAV/FLAC/OGG and anything else libsndfile reads) or waveforms (numpy arrays /
tensors, ``[samples]`` or ``[channels, samples]``); each becomes mono float32 at :data:`SAMPLE_RATE`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence, Union

import numpy as np
import torch

from .resampling import SAMPLE_RATE, resample

__all__ = ["AudioError", "AudioInput", "audio_info", "read_audio", "normalize_waveform"]

NORMALIZE_EPS = 1e-7  # transformers' zero_mean_unit_var_norm adds this to the variance

AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]


class AudioError(RuntimeError):
    """An audio input cannot be used (unreadable, empty, too short); the message names the file."""


def _soundfile():
    try:
        import soundfile
    except ImportError:
        raise ImportError(
            "reading audio files needs the soundfile package (pip install soundfile); it wraps libsndfile "
            "for WAV, FLAC and OGG"
        ) from None
    return soundfile


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(frames, sample_rate, channels)`` from the file's header, without reading the samples."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a regular file")
    sf = _soundfile()
    try:
        info = sf.info(path)
    except Exception as exc:  # libsndfile's errors are RuntimeError subclasses with its message
        raise AudioError(f"{path}: cannot read audio (corrupt or unsupported format?): {exc}") from exc
    if info.frames <= 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    return int(info.frames), int(info.samplerate), int(info.channels)


_PROBE_FRAMES = 4096


def _check_decodable(path: str, frames: int) -> None:
    """Decode the file's last few thousand frames: a cheap check, before any model runs, that finds
    truncated or corrupt streams whose header still claims the full length (a cut-off FLAC, say)."""
    sf = _soundfile()
    tail = min(frames, _PROBE_FRAMES)
    try:
        with sf.SoundFile(path) as f:
            f.seek(frames - tail)
            got = f.read(tail, dtype="float32", always_2d=True).shape[0]
    except Exception as exc:
        raise AudioError(f"{path}: cannot decode the end of the audio (truncated or corrupt file?): {exc}") from exc
    if got != tail:
        raise AudioError(f"{path}: the header promises {frames} frames but the audio ends early (truncated file?)")


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as mono float32 at ``sample_rate``: channels averaged, then resampled.

    Raises :class:`AudioError` naming the file when it is missing, unreadable or empty.
    """
    path = os.fspath(path)
    audio_info(path)
    sf = _soundfile()
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)  # [frames, channels]
    except Exception as exc:
        raise AudioError(f"{path}: cannot read audio samples (corrupt or truncated file?): {exc}") from exc
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: the audio contains NaN or infinite samples")
    return resample(np.ascontiguousarray(mono), int(rate), sample_rate)


def _as_mono(wave: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave)
    if wave.dtype.kind not in "fiu":
        raise TypeError(f"{name}: a waveform must be a real numeric array, got dtype {wave.dtype}")
    if wave.dtype.kind == "i":  # integer PCM: scale to [-1, 1) as soundfile does
        wave = wave.astype(np.float64) / float(np.iinfo(wave.dtype).max + 1)
    elif wave.dtype.kind == "u":  # unsigned PCM (8-bit WAV) is offset binary
        mid = float(np.iinfo(wave.dtype).max + 1) / 2
        wave = (wave.astype(np.float64) - mid) / mid
    if wave.ndim == 2:
        if wave.shape[0] > wave.shape[1]:
            raise ValueError(
                f"{name}: a waveform of shape {tuple(wave.shape)} has more channels than samples; it looks like "
                f"[samples, channels] (what soundfile.read returns for multichannel audio). Waveforms are "
                f"[samples] or [channels, samples]: pass wave.T (or wave.mean(axis=1) for mono)"
            )
        wave = wave.mean(axis=0)
    elif wave.ndim != 1:
        raise ValueError(f"{name}: a waveform must have shape [samples] or [channels, samples], got {wave.shape}")
    if wave.size == 0:
        raise AudioError(f"{name}: the waveform is empty")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: the waveform contains NaN or infinite samples")
    with np.errstate(over="ignore"):
        wave32 = np.ascontiguousarray(wave, dtype=np.float32)
    if not np.isfinite(wave32).all():  # finite float64 values beyond float32's range
        raise AudioError(f"{name}: the waveform has samples beyond float32's range (largest magnitude "
                         f"{float(np.abs(wave).max()):.3g}); audio is expected in [-1, 1]")
    return wave32


def normalize_waveform(wave: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (transformers' ``zero_mean_unit_var_norm`` for one input)."""
    w = wave.astype(np.float64)
    return ((w - w.mean()) / np.sqrt(w.var() + NORMALIZE_EPS)).astype(np.float32)


# ============================================================================================ sources
@dataclasses.dataclass
class _Source:
    name: str
    length: int  # samples at 16 kHz
    path: str | None = None
    wave: np.ndarray | None = None

    def load(self) -> np.ndarray:
        return self.wave if self.wave is not None else read_audio(self.path)


def _sources(inputs: Sequence[AudioInput] | AudioInput, sample_rate: int,
             failures: dict[str, str] | None = None) -> list[_Source | None]:
    """One source per input. A file's header is read and the end of its audio decoded (cheap checks,
    before any model runs). With ``failures``, an input that fails them is recorded there
    (name -> reason) and its entry is None; without, the :class:`AudioError` is raised."""
    if isinstance(inputs, (str, os.PathLike, np.ndarray, torch.Tensor)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ValueError("inputs must name at least one audio file or waveform")
    out: list[_Source | None] = []
    for index, item in enumerate(inputs):
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            try:
                frames, rate, _ = audio_info(path)
                _check_decodable(path, frames)
            except AudioError as exc:
                if failures is None:
                    raise
                failures[path] = str(exc)
                out.append(None)
                continue
            out.append(_Source(path, -(-frames * SAMPLE_RATE // rate), path=path))
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            name = f"waveform {index}"
            try:
                wave = resample(_as_mono(item, name), sample_rate, SAMPLE_RATE)
            except AudioError as exc:  # empty or non-finite; a wrong type or layout still raises
                if failures is None:
                    raise
                failures[name] = str(exc)
                out.append(None)
                continue
            out.append(_Source(name, int(wave.shape[0]), wave=wave))
        else:
            raise TypeError(f"inputs[{index}] must be a file path or a waveform array, got {type(item).__name__}")
    return out
