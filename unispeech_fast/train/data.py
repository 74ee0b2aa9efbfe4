"""Training data: manifests, label encoding, length-bucketed batch plans and waveform loading.

Manifest formats (paths relative to the manifest's directory, or to the fairseq root line):

- JSONL: one object per line, ``{"path": ..., "duration": SECONDS, "label": ...}``;
- TSV with a header line naming the columns ``path``, ``duration`` (seconds) and optionally ``label``;
- the authors' fairseq ``.tsv``: first line the root directory, then ``relative_path<TAB>num_samples``
  (at 16 kHz); labels come from a parallel file (``--labels``: ``.ltr`` letters separated by spaces
  with ``|`` between words, ``.wrd`` words, ``.km`` unit ids, ``.phn`` phones separated by
  spaces), one line per audio line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..audio import SAMPLE_RATE, AudioError, audio_info, normalize_waveform, read_audio

__all__ = ["Entry", "ManifestError", "read_manifest", "encode_labels", "encode_pretraining_labels", "plan_batches",
           "check_audio", "load_example"]


class ManifestError(ValueError):
    """A manifest or label file that cannot be used; the message names the file and line."""


@dataclass
class Entry:
    path: str
    duration: float  # seconds
    label: Any = None
    index: int = field(default=0)  # position in the manifest (the sample's global index)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc


def _duration(value: Any, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: duration must be a number of seconds, got {value!r}") from None
    if not np.isfinite(seconds) or seconds <= 0:
        raise ManifestError(f"{where}: duration must be a positive number of seconds, got {value!r}")
    return seconds


def read_manifest(path: str | os.PathLike, labels: str | os.PathLike | None = None) -> list[Entry]:
    """The entries of a JSONL, TSV or fairseq ``.tsv`` manifest (see the module docstring)."""
    path = os.fspath(path)
    lines = _read_lines(path)
    base = os.path.dirname(os.path.abspath(path))
    entries: list[Entry] = []
    if path.endswith(".jsonl"):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: not a JSON object: {exc}") from None
            if not isinstance(obj, dict) or "path" not in obj or "duration" not in obj:
                raise ManifestError(f"{where}: each line must be an object with 'path' and 'duration'")
            entries.append(Entry(os.path.join(base, str(obj["path"])), _duration(obj["duration"], where),
                                 obj.get("label")))
    else:
        if not lines:
            raise ManifestError(f"{path}: empty manifest")
        head = lines[0].rstrip("\n")
        if "\t" not in head:  # fairseq: the root directory, then relative path <TAB> samples
            root = head if os.path.isabs(head) else os.path.join(base, head)
            for n, line in enumerate(lines[1:], 2):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 2:
                    raise ManifestError(f"{path}:{n}: expected 'relative_path<TAB>num_samples'")
                samples = _duration(parts[1], f"{path}:{n}")
                entries.append(Entry(os.path.join(root, parts[0]), samples / SAMPLE_RATE))
        else:
            columns = head.split("\t")
            if "path" not in columns or "duration" not in columns:
                raise ManifestError(f"{path}:1: the TSV header must name 'path' and 'duration' columns, got {columns}")
            for n, line in enumerate(lines[1:], 2):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != len(columns):
                    raise ManifestError(f"{path}:{n}: {len(parts)} fields, the header has {len(columns)}")
                row = dict(zip(columns, parts))
                entries.append(Entry(os.path.join(base, row["path"]), _duration(row["duration"], f"{path}:{n}"),
                                     row.get("label")))
    if labels is not None:
        labels = os.fspath(labels)
        label_lines = _read_lines(labels)
        if len(label_lines) != len(entries):
            raise ManifestError(f"{labels}: {len(label_lines)} label lines for {len(entries)} audio entries in {path}")
        kind = os.path.splitext(labels)[1]
        for entry, line in zip(entries, label_lines):
            entry.label = line.split() if kind in (".ltr", ".km", ".phn") else line
    if not entries:
        raise ManifestError(f"{path}: no entries")
    for i, entry in enumerate(entries):
        entry.index = i
    return entries


def encode_labels(entries: Sequence[Entry], task: str, config, vocab: dict[str, int] | None = None) -> None:
    """Replace each entry's label by what the model's loss takes, in place (errors name the entry).

    - ``ctc``: a list of tokens (``.ltr``) or a text whose characters are tokens, a space meaning
      the word delimiter ``|``; each token must be in ``vocab``;
    - ``classify``/``xvector``: a label that is a key of ``config.label2id`` is that class, names
      first: with ``label2id = {"0": 0, "1": 1, "10": 2, ...}`` (speaker ids sorted as strings) the
      label ``"10"`` is class 2, never id 10. Any other label must be an integer id in
      ``[0, config.num_labels)``.
    """
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    for entry in entries:
        where = f"entry {entry.index} ({entry.path})"
        if entry.label is None:
            raise ManifestError(f"{where}: task {task!r} needs a label")
        if task == "ctc":
            if vocab is None:
                raise ManifestError("task 'ctc' needs a vocab.json (token -> id)")
            label = entry.label
            tokens = label if isinstance(label, list) else ["|" if c == " " else c for c in str(label)]
            missing = sorted({t for t in tokens if t not in vocab})
            if missing:
                raise ManifestError(f"{where}: tokens not in the vocabulary: {missing}")
            if not tokens:
                raise ManifestError(f"{where}: empty transcript")
            entry.label = [vocab[t] for t in tokens]
        else:
            name = str(entry.label)
            if name in label2id:
                value = label2id[name]
            else:
                try:
                    value = int(name)
                except ValueError:
                    raise ManifestError(
                        f"{where}: label {name!r} is neither in config.label2id nor an integer id") from None
            if not 0 <= value < config.num_labels:
                raise ManifestError(f"{where}: label {value} is outside [0, num_labels={config.num_labels})")
            entry.label = value


def encode_pretraining_labels(entries: Sequence[Entry], model_type: str, config, vocab: dict[str, int] | None,
                              blank: int | None = None) -> None:
    """Replace each entry's label by the ids the pre-training head takes, in place (errors name the entry).

    - ``unispeech-sat``: frame cluster ids (a ``.km`` line: integers separated by spaces) in
      ``[0, num_clusters)``;
    - ``unispeech``: phone tokens (a ``.phn``/``.ltr`` line) mapped through ``vocab`` to ids in
      ``[0, num_ctc_classes)``, none of them the CTC blank ``blank``.
    """
    for entry in entries:
        where = f"entry {entry.index} ({entry.path})"
        if entry.label is None:
            raise ManifestError(f"{where}: no label (give every entry one, or none)")
        tokens = entry.label if isinstance(entry.label, list) else str(entry.label).split()
        if not tokens:
            raise ManifestError(f"{where}: empty label line")
        if model_type == "unispeech-sat":
            try:
                ids = [int(t) for t in tokens]
            except ValueError:
                raise ManifestError(f"{where}: cluster labels must be integers, got {tokens[:5]}...") from None
            bad = sorted({i for i in ids if not 0 <= i < config.num_clusters})
            if bad:
                raise ManifestError(f"{where}: cluster ids {bad[:5]} outside [0, num_clusters={config.num_clusters})")
        else:
            if vocab is None:
                raise ManifestError("UniSpeech phone labels need a vocab.json (phone -> id)")
            missing = sorted({str(t) for t in tokens if str(t) not in vocab})
            if missing:
                raise ManifestError(f"{where}: phones not in the vocabulary: {missing}")
            ids = [vocab[str(t)] for t in tokens]
            bad = sorted({i for i in ids if not 0 <= i < config.num_ctc_classes or i == blank})
            if bad:
                raise ManifestError(f"{where}: phone ids {bad} outside [0, num_ctc_classes={config.num_ctc_classes}) "
                                    f"or equal to the CTC blank {blank}")
        entry.label = ids


def plan_batches(durations: Sequence[float], max_batch_seconds: float, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of manifest indices for one epoch.

    Files are sorted by duration and cut into batches whose padded length (count x longest) stays at
    most ``max_batch_seconds`` (a longer file forms a batch alone); the batch order is then shuffled
    with a generator seeded by ``(seed, epoch)``, so every rank and every resumed run plans the same.
    """
    order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * durations[i] > max_batch_seconds:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    return [batches[j] for j in rng.permutation(len(batches))]


def check_audio(entry: Entry, min_samples: int) -> str | None:
    """Why ``entry``'s file cannot be used (header unreadable, too short), or None."""
    try:
        frames, rate, _ = audio_info(entry.path)
    except AudioError as exc:
        return str(exc)
    if frames * SAMPLE_RATE // rate < min_samples:
        return f"{entry.path}: too short for the model ({frames} samples at {rate} Hz, needs {min_samples} at 16 kHz)"
    return None


def load_example(entry: Entry, normalize: bool, mask_seed: int | None) -> dict[str, Any]:
    """The collator's example for ``entry``; raises :class:`AudioError` naming the file."""
    wave = read_audio(entry.path)
    if normalize:
        wave = normalize_waveform(wave)
    import torch

    example: dict[str, Any] = {"input_values": torch.from_numpy(np.ascontiguousarray(wave))}
    if entry.label is not None:
        example["labels"] = torch.tensor(entry.label)
    if mask_seed is not None:
        example["mask_seed"] = mask_seed
    return example
