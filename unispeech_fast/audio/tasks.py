"""The four inference tasks (embed, transcribe, diarize, x-vectors), their runner, RTTM and scores.

See :mod:`unispeech_fast.audio` for batching, padding and failure semantics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..loading import ModelMismatchError, _read_json_object, load_model
from .batching import Progress, _stage_hooks, plan_batches
from .io import AudioError, _Source, _sources, normalize_waveform
from .resampling import SAMPLE_RATE

__all__ = ["Segment", "load_vocab", "ctc_greedy_decode", "embed", "transcribe", "frame_probabilities", "diarize",
           "segments_from_probabilities", "rttm_lines", "rttm_file_id", "xvectors", "cosine_scores"]


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
    from ..dispatch import log_once
    from ..models.heads import tdnn_lengths_use_dilation

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
                        "the padding, so results differ from single-file runs (by more than rounding: an embedding or a "
                        "transcript can change); pass exact=True "
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
    from ..dispatch import log_once

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
