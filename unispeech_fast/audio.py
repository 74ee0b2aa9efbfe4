"""Inference on audio files: reading, resampling, length-bucketed batching and a Python API.

The four tasks of the ``unispeech-fast embed|transcribe|diarize|verify-speakers`` commands
(:mod:`unispeech_fast.audio_cli`) are plain functions here::

    from unispeech_fast import audio
    model = audio.load_model("path/to/checkpoint")          # class from config.json "architectures"
    vectors = audio.embed(model, ["a.wav", "b.flac"])         # mean-pooled last_hidden_state per file
    texts = audio.transcribe(model, ["a.wav"])                # ForCTC + vocab.json, greedy decoding
    segments = audio.diarize(model, ["meeting.wav"])          # ForAudioFrameClassification
    emb = audio.xvectors(model, ["a.wav", "b.wav"]); audio.cosine_scores(emb)   # ForXVector

Inputs are file paths (WAV/FLAC/OGG and anything else libsndfile reads, through ``soundfile``) or
waveforms (numpy arrays / tensors, ``[samples]`` or ``[channels, samples]``, at ``sample_rate``).
Every input is mixed down to mono (mean over channels), resampled to 16 kHz with :func:`resample`
when needed and, when the checkpoint's ``preprocessor_config.json`` asks for it (``do_normalize``;
transformers' Wav2Vec2FeatureExtractor default is True), normalised to zero mean and unit variance
(``(x - mean) / sqrt(var + 1e-7)``, as that feature extractor does).

Batching (:func:`plan_batches`): inputs are sorted by length and packed greedily, longest first,
into batches whose padding stays below ``max_padding`` (a fraction of the padded batch) and whose
padded size stays below ``max_batch_seconds`` of audio (a file longer than that runs alone). Padded
batches run with an ``attention_mask``; results are trimmed to each input's own frames and returned
in input order.

- Layer-norm checkpoints (``feat_extract_norm == "layer"``): the padded batch gives each input's
  single-utterance result (to float rounding).
- Group-norm checkpoints (``feat_extract_norm == "group"``, the base models): the first conv layer
  normalises over the whole (padded) time axis, so the zeros of padding shift every frame of the
  shorter inputs. transformers' feature extractor for these checkpoints returns no attention mask
  at all (``return_attention_mask=False``), so its batched results differ from single-utterance
  ones in the encoder too. We pass the attention mask (padded frames are then ignored by the
  encoder), which leaves only the group-norm shift; a log line says so. ``exact=True`` (``--exact``)
  batches only inputs of identical length, so no padding exists and every result equals the
  single-utterance one; it costs speed where lengths all differ (then each file runs alone).
- ForXVector: transformers computes the pooled frames of a padded input without the TDNN dilation
  (so it pools a few frames computed from padding); these functions count the dilation for their
  own calls (:func:`unispeech_fast.models.heads.tdnn_lengths_use_dilation`, a context variable:
  the config is not written) so padded inputs pool exactly their own frames, as a single-utterance
  run does.

Threads: an inference call writes nothing to the model or its config, so several threads may call
these functions on one model at once and get the single-thread results. (With ``progress`` on, the
call adds forward hooks to the model for its duration to move the bar; leave it off, the default,
for concurrent calls.)

Bad inputs: by default the first unusable input (missing, unreadable, truncated, too short,
non-finite) raises :class:`AudioError` naming it, before the model runs where the check is cheap
(the header is read and the end of the audio decoded for every file first). Pass
``failures={}`` (a dict) to collect them instead: each bad input is recorded as name -> reason,
its result is None, and every other input still runs.

Long inputs: the conv feature encoder tiles long waveforms exactly by itself
(:mod:`unispeech_fast.tiling`); the transformer runs on the whole input in one pass (attention is
quadratic in the number of 20 ms frames). The optional progress bar advances per conv stack and per
transformer layer, so it moves within a single long file too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import numbers
import os
import sys
import time
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import torch

__all__ = [
    "SAMPLE_RATE",
    "AudioError",
    "ModelMismatchError",
    "Segment",
    "read_audio",
    "audio_info",
    "resample",
    "normalize_waveform",
    "plan_batches",
    "load_model",
    "load_vocab",
    "ctc_greedy_decode",
    "embed",
    "transcribe",
    "frame_probabilities",
    "diarize",
    "rttm_lines",
    "rttm_file_id",
    "xvectors",
    "cosine_scores",
    "Progress",
]

SAMPLE_RATE = 16_000
NORMALIZE_EPS = 1e-7  # transformers' zero_mean_unit_var_norm adds this to the variance

AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]


class AudioError(RuntimeError):
    """An audio input cannot be used (unreadable, empty, too short); the message names the file."""


class ModelMismatchError(ValueError):
    """The checkpoint's class does not fit the task (e.g. ``transcribe`` on a model without a CTC head)."""


# ============================================================================================ reading
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


# ============================================================================================ resampling
# Memory bounds of resampling. Common ratios (8, 22.05, 44.1, 48 kHz to 16 kHz) run as one strided
# conv1d whose weight ``[up, 1, down + 2 * pad + 1]`` has at most _BANK_MAX_TAPS entries (8 MiB in
# float64; at most _BANK_CACHE weights are cached). Other ratios (e.g. 2001 or 16001 Hz to 16 kHz:
# 16000 phases, a 0.26 to 2 GiB conv weight) gather each output's 2 * pad + 1 input samples instead,
# with taps from a cached per-phase bank when that is small, else computed per chunk of outputs; the
# chunks hold at most _CHUNK_TAPS taps, so the working memory is bounded whatever the ratio and length.
_BANK_MAX_TAPS = 1 << 20
_BANK_CACHE = 8
_CHUNK_TAPS = 1 << 21


def _filter_geometry(orig: int, new: int, zeros: int, rolloff: float) -> tuple[int, int, float, float, int]:
    """``(up, down, cutoff, half_width, pad)`` of the resampling filter (see :func:`_filter_taps`)."""
    g = math.gcd(orig, new)
    up, down = new // g, orig // g
    cutoff = 0.5 * rolloff * min(1.0, up / down)
    half_width = zeros / (2.0 * cutoff)
    return up, down, cutoff, half_width, int(math.ceil(half_width))


def _filter_taps(phases: torch.Tensor, up: int, cutoff: float, half_width: float, pad: int,
                 beta: float) -> torch.Tensor:
    """Taps ``[len(phases), 2 * pad + 1]`` (float64) of the outputs at fractional input offsets ``phases / up``.

    With ``up/down = new/orig`` in lowest terms, output sample ``n`` sits at input position
    ``n * down / up = q + p / up`` (``q`` integer, ``0 <= p < up``); it is
    ``sum_j x[q + j] * h(p / up - j)`` for ``j`` in ``[-pad, pad]``, the input convolved with a
    Kaiser-windowed ideal low-pass ``h(t) = 2 f sinc(2 f t) w(t)``, ``t`` in input samples, cut off at
    ``f = rolloff / 2 * min(1, up / down)`` cycles per input sample (just below the lower of the two
    Nyquist frequencies: this is the anti-aliasing filter), ``w`` a Kaiser window over ``zeros`` zero
    crossings of the sinc on each side. Row ``i``, column ``pad + j`` holds ``h(phases[i] / up - j)``.
    """
    j = torch.arange(-pad, pad + 1, dtype=torch.float64)
    t = phases.to(torch.float64)[:, None] / up - j
    i0_beta = torch.special.i0(torch.tensor(beta, dtype=torch.float64))
    inside = t.abs() <= half_width
    window = torch.special.i0(beta * torch.sqrt((1.0 - (t / half_width) ** 2).clamp(min=0.0))) / i0_beta
    return torch.where(inside, 2.0 * cutoff * torch.sinc(2.0 * cutoff * t) * window, torch.zeros_like(t))


@functools.lru_cache(maxsize=_BANK_CACHE)
def _filter_bank(orig: int, new: int, zeros: int, rolloff: float, beta: float) -> torch.Tensor:
    """All ``up`` phases' taps ``[up, 2 * pad + 1]`` (float64), for ratios whose bank is small."""
    up, _, cutoff, half_width, pad = _filter_geometry(orig, new, zeros, rolloff)
    return _filter_taps(torch.arange(up), up, cutoff, half_width, pad, beta)


@functools.lru_cache(maxsize=_BANK_CACHE)
def _conv_weight(orig: int, new: int, zeros: int, rolloff: float, beta: float) -> torch.Tensor:
    """The filter as strided-conv1d weights ``[up, 1, down + 2 * pad + 1]`` (float64).

    Outputs ``n = n0 + up * m`` share the phase ``p = n0 * down mod up`` and the offset
    ``q0 = floor(n0 * down / up)``, so one conv1d of stride ``down`` with ``up`` output channels
    computes them all; channel ``n0`` holds ``h(p / up - j)`` at tap ``q0 + j + pad``.
    """
    up, down, _, _, pad = _filter_geometry(orig, new, zeros, rolloff)
    bank = _filter_bank(orig, new, zeros, rolloff, beta)
    weight = torch.zeros(up, 1, down + 2 * pad + 1, dtype=torch.float64)
    for n0 in range(up):
        q0 = (n0 * down) // up
        weight[n0, 0, q0:q0 + 2 * pad + 1] = bank[(n0 * down) % up]
    return weight


def resample(
    wave: np.ndarray | torch.Tensor,
    orig_rate: int,
    new_rate: int = SAMPLE_RATE,
    *,
    zeros: int = 24,
    rolloff: float = 0.945,
    beta: float = 8.6,
) -> np.ndarray | torch.Tensor:
    """Band-limited resampling by a rational ratio with a Kaiser-windowed sinc (polyphase) filter.

    ``wave`` is ``[samples]`` or ``[channels, samples]`` (numpy or torch; the result has the same
    kind, float32 unless the input is float64). The output has ``ceil(samples * new / orig)`` samples;
    output sample ``n`` is the band-limited input at time ``n / new_rate``. Frequencies below
    ``rolloff`` times the lower Nyquist frequency pass with unit gain (ripple well under 1%); those
    above the output Nyquist frequency are suppressed (anti-aliasing), by about 80 dB past the
    transition band. See :func:`_filter_taps` for the construction.

    Memory is bounded for every pair of rates: only the taps of the phases in use are built (at
    most ``2 * pad + 1`` per output phase, ``pad`` about ``zeros / rolloff * max(1, orig / new)``),
    cached only when small, and the outputs are computed in chunks.
    """
    for name, rate in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise ValueError(f"{name} must be a positive integer sample rate in Hz, got {rate!r}")
    if not 0.0 < rolloff <= 1.0:
        raise ValueError(f"rolloff must be in (0, 1], got {rolloff!r}")
    if isinstance(zeros, bool) or not isinstance(zeros, int) or zeros < 1:
        raise ValueError(f"zeros must be a positive int (zero crossings per side), got {zeros!r}")
    is_numpy = not isinstance(wave, torch.Tensor)
    x = torch.from_numpy(np.asarray(wave)) if is_numpy else wave
    if x.dim() not in (1, 2):
        raise ValueError(f"wave must have shape [samples] or [channels, samples], got {tuple(x.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    if int(orig_rate) == int(new_rate):
        out = x
    else:
        orig, new = int(orig_rate), int(new_rate)
        up, down, cutoff, half_width, pad = _filter_geometry(orig, new, zeros, float(rolloff))
        width = 2 * pad + 1
        rows = x.reshape(-1, x.shape[-1])
        n_in = rows.shape[-1]
        n_out = -(-n_in * up // down)
        if up * (down + width) <= _BANK_MAX_TAPS:  # a small polyphase conv weight: one strided conv1d
            weight = _conv_weight(orig, new, zeros, float(rolloff), float(beta))
            steps = -(-n_out // up)
            needed = (steps - 1) * down + weight.shape[-1]
            padded = torch.nn.functional.pad(rows[:, None, :], (pad, max(0, needed - n_in - pad)))
            y = torch.nn.functional.conv1d(padded, weight.to(device=x.device, dtype=dtype), stride=down)
            out = y[..., :steps].transpose(1, 2).reshape(rows.shape[0], -1)[:, :n_out]
        else:  # gather each output's 2 * pad + 1 inputs, chunk by chunk
            bank = None
            if up * width <= _BANK_MAX_TAPS:
                bank = _filter_bank(orig, new, zeros, float(rolloff), float(beta)).to(device=x.device, dtype=dtype)
            # windows[:, i] = x[i - pad : i + pad + 1] (zeros outside), a view of the padded input
            windows = torch.nn.functional.pad(rows, (pad, pad)).unfold(-1, width, 1)
            out = torch.empty(rows.shape[0], n_out, dtype=dtype, device=x.device)
            chunk = max(1, _CHUNK_TAPS // (width * rows.shape[0]))
            for start in range(0, n_out, chunk):
                n = torch.arange(start, min(n_out, start + chunk), dtype=torch.int64)
                q, p = (n * down) // up, (n * down) % up
                if bank is not None:
                    taps = bank[p.to(x.device)]
                else:
                    taps = _filter_taps(p, up, cutoff, half_width, pad, float(beta)).to(device=x.device, dtype=dtype)
                out[:, start:start + n.numel()] = (windows[:, q.to(x.device)] * taps).sum(dim=-1)
        out = out.reshape(*x.shape[:-1], n_out)
    return out.numpy() if is_numpy else out


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


# ============================================================================================ batching
def plan_batches(
    lengths: Sequence[int],
    max_batch_samples: int,
    max_padding: float = 0.15,
    exact: bool = False,
) -> list[list[int]]:
    """Group input indices into batches, longest first.

    Indices are sorted by length (descending, ties in input order) and added greedily to the
    current batch while ``batch_size * longest <= max_batch_samples`` and the padded fraction
    ``1 - sum(lengths) / (batch_size * longest)`` stays ``<= max_padding``; ``exact`` allows equal
    lengths only (no padding at all). An input longer than ``max_batch_samples`` forms its own batch.
    """
    if not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding!r}")
    if max_batch_samples <= 0:
        raise ValueError(f"max_batch_samples must be positive, got {max_batch_samples!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        n = lengths[i]
        if current:
            longest = lengths[current[0]]
            size = len(current) + 1
            fits = size * longest <= max_batch_samples
            if exact:
                fits = fits and n == longest
            else:
                fits = fits and 1.0 - (total + n) / (size * longest) <= max_padding + 1e-12
            if fits:
                current.append(i)
                total += n
                continue
            batches.append(current)
        current, total = [i], n
    if current:
        batches.append(current)
    return batches


# ============================================================================================ progress
class Progress:
    """A small progress bar on stderr: ``desc  42% |########          | 12.3/29.0 s audio, 3/7 files``.

    On a terminal it redraws one line; elsewhere (logs, pipes) it prints a line every 10%.
    """

    def __init__(self, total: float, desc: str, files: int, enabled: bool = True, stream=None) -> None:
        self.total = max(float(total), 1e-9)
        self.desc, self.files, self.enabled = desc, files, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.files_done = 0.0, 0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw, self._last_decile = 0.0, -1
        self._start = time.perf_counter()

    def advance(self, amount: float, files: int = 0) -> None:
        self.done = min(self.total, self.done + amount)
        self.files_done += files
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw >= 0.1 or self.done >= self.total:
                self._draw("\r", "")
                self._last_draw = now
        else:
            decile = int(10 * self.done / self.total + 1e-9)
            if self.files_done < self.files:
                decile = min(decile, 9)  # the 100% line waits for the last batch's results
            if decile > self._last_decile:
                self._last_decile = decile
                self._draw("", "\n")

    def _draw(self, prefix: str, suffix: str) -> None:
        frac = self.done / self.total
        bar = "#" * int(round(20 * frac))
        elapsed = time.perf_counter() - self._start
        self.stream.write(
            f"{prefix}{self.desc} {100 * frac:3.0f}% |{bar:<20}| {self.done / SAMPLE_RATE:.1f}/"
            f"{self.total / SAMPLE_RATE:.1f} s audio, {self.files_done}/{self.files} files, {elapsed:.1f} s{suffix}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self._draw("\r", "\n")


@contextlib.contextmanager
def _stage_hooks(model, on_stage: Callable[[], None], enabled: bool):
    """Call ``on_stage`` after the conv feature encoder and after every transformer layer.

    This registers forward hooks on the model for the block, so it is used only when a progress bar
    is shown (``enabled``); without one (the API default) an inference call leaves the model as it is.
    """
    backbone = model.base_model
    modules = [backbone.feature_extractor, *backbone.encoder.layers]
    if not enabled:
        yield len(modules)
        return
    handles = [m.register_forward_hook(lambda *_: on_stage()) for m in modules]
    try:
        yield len(modules)
    finally:
        for h in handles:
            h.remove()


# ============================================================================================ models
def _model_classes() -> dict[str, type]:
    from .models import MODEL_CLASSES

    return {cls.__name__: cls for cls in MODEL_CLASSES}


def load_model(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Load a checkpoint directory with the class named in its ``config.json`` ("architectures").

    Without "architectures" the bare backbone of the config's ``model_type`` is used. The model
    gets two attributes these functions read: ``checkpoint_dir`` (where ``vocab.json`` is looked
    up) and ``preprocessor_config`` (the directory's ``preprocessor_config.json``, or ``{}``).
    """
    from .loading import CheckpointError, resolve_directory

    directory = resolve_directory(path)
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"no config.json in {directory}")
    config = _read_json_object(config_file, CheckpointError)
    classes = _model_classes()
    archs = config.get("architectures") or []
    if archs:
        name = archs[0]
        if name not in classes:
            raise ModelMismatchError(
                f"{config_file}: architectures[0] is {name!r}, which unispeech_fast does not implement "
                f"(known: {', '.join(sorted(classes))})"
            )
    else:
        model_type = config.get("model_type")
        backbones = {"unispeech": "UniSpeechModel", "unispeech-sat": "UniSpeechSatModel"}
        if model_type not in backbones:
            raise ModelMismatchError(
                f"{config_file}: no 'architectures' field, and model_type {model_type!r} is neither "
                "'unispeech' nor 'unispeech-sat'"
            )
        name = backbones[model_type]
    model = classes[name].from_pretrained(directory, dtype=dtype, device=device)
    model.checkpoint_dir = directory
    model.preprocessor_config = {}
    pre = os.path.join(directory, "preprocessor_config.json")
    if os.path.isfile(pre):
        model.preprocessor_config = _read_json_object(pre, CheckpointError)
    return model.eval()


def _read_json_object(path: str, error: type[Exception]) -> dict:
    """The JSON object in ``path``; ``error`` naming the file when it is not valid JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _resolve_model(model, device=None, dtype=None):
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device=device, dtype=dtype)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "base_model"):
        raise TypeError(f"model must be a unispeech_fast model or a checkpoint directory, got {type(model).__name__}")
    return model


def _require_head(model, head: str, task: str):
    """Check that ``model`` is a ``...<head>`` class (e.g. ``ForCTC``) for ``task``."""
    name = type(model).__name__
    if not name.endswith(head):
        raise ModelMismatchError(
            f"{task} needs a checkpoint of a *{head} class (config.json architectures), but this one is {name}"
        )


def _min_samples(model) -> int:
    """Fewest 16 kHz samples the model (and, for ForXVector, its TDNN pooling) can take."""
    config = model.config
    minimum = config.receptive_field()
    if type(model).__name__.endswith("ForXVector"):
        frames = 2 + sum((k - 1) * d for k, d in zip(config.tdnn_kernel, config.tdnn_dilation))
        minimum += (frames - 1) * config.inputs_to_logits_ratio
    return minimum


# ============================================================================================ runner
def _run(
    model,
    inputs,
    step: Callable[[Any, torch.Tensor, torch.Tensor | None, list[int]], list[Any]],
    *,
    sample_rate: int,
    max_batch_seconds: float,
    max_padding: float,
    exact: bool,
    normalize: bool | None,
    progress: bool | Progress,
    failures: dict[str, str] | None,
    desc: str,
) -> tuple[list[_Source | None], list[Any]]:
    """Load, bucket, batch, run ``step(model, batch, mask, lengths)`` per batch, unsort.

    Nothing here writes to the model or its config (without a progress bar), so calls on one model
    from several threads give the single-thread results. With ``failures`` (a dict), an input that
    cannot be used is recorded there (name -> reason) and its result is None; the others still run.
    """
    from .dispatch import log_once
    from .models.heads import tdnn_lengths_use_dilation

    if isinstance(max_batch_seconds, bool) or not isinstance(max_batch_seconds, numbers.Real) \
            or not (max_batch_seconds > 0 and math.isfinite(max_batch_seconds)):
        raise ValueError(f"max_batch_seconds must be a positive, finite number of seconds, got {max_batch_seconds!r}")
    if failures is not None and not isinstance(failures, dict):
        raise TypeError(f"failures must be a dict (to collect input name -> reason) or None, got "
                        f"{type(failures).__name__}")
    max_batch_samples = max(1, int(max_batch_seconds * SAMPLE_RATE))  # below one file: each file runs alone

    def fail(source: _Source, message: str) -> None:
        if failures is None:
            raise AudioError(message)
        failures[source.name] = message

    sources = _sources(inputs, sample_rate, failures)
    minimum = _min_samples(model)
    for k, s in enumerate(sources):
        if s is not None and s.length < minimum:
            fail(s, f"{s.name}: {s.length} samples ({s.length / SAMPLE_RATE:.3f} s at 16 kHz) is too short; "
                    f"{type(model).__name__} needs at least {minimum} ({minimum / SAMPLE_RATE:.3f} s)")
            sources[k] = None
    usable = [k for k, s in enumerate(sources) if s is not None]
    if normalize is None:
        normalize = bool(getattr(model, "preprocessor_config", {}).get("do_normalize", True))
    group_norm = model.config.feat_extract_norm == "group"
    batches = [[usable[i] for i in b]
               for b in plan_batches([sources[k].length for k in usable], max_batch_samples, max_padding, exact)]
    bar = progress if isinstance(progress, Progress) else Progress(
        sum(sources[k].length for k in usable), desc, len(usable), enabled=bool(progress))
    device, dtype = model.device, model.dtype
    results: list[Any] = [None] * len(sources)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if type(model).__name__.endswith("ForXVector"):
            stack.enter_context(tdnn_lengths_use_dilation(True))  # this context only; the config is untouched
        stage_share = [0.0]
        stages = stack.enter_context(_stage_hooks(model, lambda: bar.advance(stage_share[0]), bar.enabled))
        for batch in batches:
            kept, waves = [], []
            for i in batch:
                try:
                    w = sources[i].load()
                    if normalize:
                        w = normalize_waveform(w)
                    if not bool(torch.isfinite(torch.from_numpy(w).to(dtype)).all()):
                        raise AudioError(
                            f"{sources[i].name}: samples beyond the range of the model's dtype {dtype} "
                            f"(largest magnitude {float(np.abs(w).max()):.3g}); normalise the audio or use "
                            "a wider dtype")
                except AudioError as exc:
                    fail(sources[i], str(exc))
                    bar.advance(sources[i].length, files=1)
                    continue
                kept.append(i)
                waves.append(w)
            if not kept:
                continue
            lengths = [int(w.shape[0]) for w in waves]
            longest = max(lengths)
            x = torch.zeros(len(waves), longest, dtype=torch.float32)
            for row, w in enumerate(waves):
                x[row, : w.shape[0]] = torch.from_numpy(w)
            mask = None
            if min(lengths) != longest:
                mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).to(torch.long).to(device)
                if group_norm:
                    log_once(
                        "audio-group-norm-padding",
                        "group-norm checkpoint batched with padding: the first conv layer's statistics include "
                        "the padding, so results differ slightly from single-file runs; pass exact=True "
                        "(--exact) to batch only equal lengths",
                    )
            stage_share[0] = sum(lengths) / stages
            before = bar.done
            outputs = step(model, x.to(device=device, dtype=dtype), mask, lengths)
            bar.advance(before + sum(lengths) - bar.done, files=len(kept))  # settle rounding
            for i, out in zip(kept, outputs):
                results[i] = out
    if not isinstance(progress, Progress):
        bar.close()
    return sources, results


def _run_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    defaults = dict(sample_rate=SAMPLE_RATE, max_batch_seconds=60.0, max_padding=0.15, exact=False,
                    normalize=None, progress=False, failures=None)
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {**defaults, **kwargs}


# ============================================================================================ embed
def embed(model, inputs, *, layer: int | None = None, pool: str = "mean", **options) -> list[np.ndarray]:
    """Backbone features per input: ``last_hidden_state`` (or ``hidden_states[layer]``, indexed as
    transformers returns them: 0 is the encoder input, ``num_hidden_layers`` the last layer's output).

    ``pool="mean"`` averages each input's own frames (``[hidden]`` per input); ``pool="frames"``
    returns them all (``[frames, hidden]``). Any checkpoint class works (its backbone runs alone).
    ``options``: ``sample_rate`` (of waveform inputs), ``max_batch_seconds``, ``max_padding``,
    ``exact``, ``normalize``, ``progress``, ``failures`` (see the module docstring).
    """
    if pool not in ("mean", "frames"):
        raise ValueError(f"pool must be 'mean' or 'frames', got {pool!r}")
    model = _resolve_model(model)
    n_layers = model.config.num_hidden_layers
    if layer is not None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"layer must be an int in [{-(n_layers + 1)}, {n_layers}] (hidden_states index), "
                             f"got {layer!r}")
    config = model.config

    def step(m, x, mask, lengths):
        out = m.base_model(x, attention_mask=mask, output_hidden_states=layer is not None)
        hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
        res = []
        for row, n in enumerate(lengths):
            frames = hidden[row, : config.output_length(n)].float()
            res.append((frames.mean(dim=0) if pool == "mean" else frames).cpu().numpy())
        return res

    return _run(model, inputs, step, desc="embed", **_run_kwargs(options))[1]


# ============================================================================================ transcribe
def load_vocab(path: str | os.PathLike) -> dict[int, str]:
    """``vocab.json`` (token -> id, as Wav2Vec2CTCTokenizer writes it) as id -> token."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocab file {path} does not exist (a CTC checkpoint ships vocab.json)")
    data = _read_json_object(path, ValueError)
    if data and all(isinstance(v, dict) for v in data.values()):
        if len(data) != 1:  # multi-language vocabularies (one dict per language)
            raise ValueError(f"{path}: holds vocabularies for several languages ({', '.join(data)}); "
                             "write the one you want to its own vocab.json")
        data = next(iter(data.values()))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object mapping tokens to integer ids")
    vocab = {v: k for k, v in data.items()}
    if len(vocab) != len(data):
        raise ValueError(f"{path}: several tokens share an id")
    return vocab


def ctc_greedy_decode(ids: Sequence[int], vocab: dict[int, str], blank: int, word_delimiter: str = "|") -> str:
    """Greedy CTC: collapse repeated ids, drop ``blank``, map ids to tokens and ``word_delimiter``
    to a space; runs of spaces become one and the ends are stripped. Other special tokens
    (``<unk>``, ``<s>``) are kept as text, as transformers' ``decode`` does by default."""
    from .dispatch import log_once

    pieces = []
    previous = None
    for i in ids:
        i = int(i)
        if i != previous and i != blank:
            token = vocab.get(i)
            if token is None:
                log_once(f"ctc-unknown-id-{i}", f"CTC id {i} is not in vocab.json; it is decoded as nothing")
                token = ""
            pieces.append(" " if token == word_delimiter else token)
        previous = i
    return " ".join("".join(pieces).split())


def transcribe(model, inputs, *, vocab: dict[int, str] | str | os.PathLike | None = None, **options) -> list[str]:
    """Greedy CTC transcripts (a ``*ForCTC`` checkpoint). ``vocab`` defaults to the checkpoint's
    ``vocab.json``; the blank is ``config.pad_token_id``. ``options`` as for :func:`embed`."""
    model = _resolve_model(model)
    _require_head(model, "ForCTC", "transcribe")
    if vocab is None:
        directory = getattr(model, "checkpoint_dir", None)
        if directory is None:
            raise ValueError("vocab is required for a model not loaded with load_model (no checkpoint directory known)")
        vocab = os.path.join(directory, "vocab.json")
    if not isinstance(vocab, dict):
        vocab = load_vocab(vocab)
    blank = model.config.pad_token_id
    if blank is None:
        raise ValueError("config.pad_token_id (the CTC blank) is None")
    config = model.config

    def step(m, x, mask, lengths):
        ids = m(x, attention_mask=mask).logits.argmax(dim=-1).cpu()
        return [ctc_greedy_decode(ids[row, : config.output_length(n)].tolist(), vocab, blank)
                for row, n in enumerate(lengths)]

    return _run(model, inputs, step, desc="transcribe", **_run_kwargs(options))[1]


# ============================================================================================ diarize
@dataclasses.dataclass(frozen=True)
class Segment:
    start: float  # seconds
    duration: float  # seconds
    label: str


def frame_probabilities(model, inputs, **options) -> list[np.ndarray]:
    """Per-frame sigmoid probabilities ``[frames, num_labels]`` of a ``*ForAudioFrameClassification``."""
    model = _resolve_model(model)
    _require_head(model, "ForAudioFrameClassification", "diarize")
    config = model.config

    def step(m, x, mask, lengths):
        probs = torch.sigmoid(m(x, attention_mask=mask).logits.float()).cpu()
        return [probs[row, : config.output_length(n)].numpy() for row, n in enumerate(lengths)]

    return _run(model, inputs, step, desc="diarize", **_run_kwargs(options))[1]


def _label_names(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    names = []
    for i in range(config.num_labels):
        name = id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))
        names.append("_".join(str(name).split()) or f"LABEL_{i}")
    return names


def segments_from_probabilities(probs: np.ndarray, frame_seconds: float, labels: Sequence[str],
                                threshold: float = 0.5) -> list[Segment]:
    """Runs of frames with probability ``> threshold``, per label, sorted by start time."""
    active = np.asarray(probs) > threshold
    segments = []
    for k in range(active.shape[1]):
        col = np.concatenate([[False], active[:, k], [False]])
        edges = np.flatnonzero(col[1:] != col[:-1])
        for start, stop in zip(edges[::2], edges[1::2]):
            segments.append(Segment(start * frame_seconds, (stop - start) * frame_seconds, labels[k]))
    return sorted(segments, key=lambda s: (s.start, s.label))


def diarize(model, inputs, *, threshold: float = 0.5, **options) -> list[list[Segment]]:
    """Speaker-activity segments per input from a ``*ForAudioFrameClassification`` checkpoint: a
    label is active in a frame when its sigmoid exceeds ``threshold``; frames are
    ``prod(conv_stride)`` samples (20 ms for the released configs)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    model = _resolve_model(model)
    probs = frame_probabilities(model, inputs, **options)
    frame_seconds = model.config.inputs_to_logits_ratio / SAMPLE_RATE
    labels = _label_names(model.config)
    return [None if p is None else segments_from_probabilities(p, frame_seconds, labels, threshold)
            for p in probs]


def rttm_file_id(name: str) -> str:
    """The RTTM recording id written for ``name``: whitespace runs become ``_`` (RTTM fields are
    space-separated); an empty name becomes ``audio``."""
    return "_".join(str(name).split()) or "audio"


def rttm_lines(file_id: str, segments: Iterable[Segment]) -> list[str]:
    """RTTM ``SPEAKER`` lines: ``SPEAKER <file> 1 <start> <dur> <NA> <NA> <label> <NA> <NA>``."""
    file_id = rttm_file_id(file_id)
    return [f"SPEAKER {file_id} 1 {s.start:.3f} {s.duration:.3f} <NA> <NA> {s.label} <NA> <NA>" for s in segments]


# ============================================================================================ x-vectors
def xvectors(model, inputs, **options) -> np.ndarray:
    """Speaker embeddings ``[inputs, xvector_output_dim]`` from a ``*ForXVector`` checkpoint.

    Every input must be usable (one row per input); ``options`` as for :func:`embed` except
    ``failures``."""
    if "failures" in options:
        raise TypeError("xvectors returns one row per input, so it takes no failures dict; every input must "
                        "be usable")
    return np.stack(_xvector_rows(model, inputs, **options))


def _xvector_rows(model, inputs, **options) -> list[np.ndarray | None]:
    """The rows of :func:`xvectors` as a list (None for an input recorded in ``options["failures"]``)."""
    model = _resolve_model(model)
    _require_head(model, "ForXVector", "verify-speakers")

    def step(m, x, mask, lengths):
        emb = m(x, attention_mask=mask).embeddings.float().cpu()
        return list(emb.numpy())

    return _run(model, inputs, step, desc="xvector", **_run_kwargs(options))[1]


def cosine_scores(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """Cosine similarity matrix ``[n, n]`` of the rows of ``embeddings`` (computed in float64)."""
    e = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    if e.dim() != 2:
        raise ValueError(f"embeddings must have shape [n, dim], got {tuple(e.shape)}")
    e = torch.nn.functional.normalize(e, dim=-1)
    return (e @ e.T).clamp(-1.0, 1.0).numpy()
