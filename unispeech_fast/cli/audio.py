"""File commands of the CLI: ``unispeech-fast embed|transcribe|diarize|verify-speakers AUDIO... --model DIR``.

:func:`add_parsers` adds the four subcommands to an ``argparse`` subparsers object; each sets
``func`` to its ``run_*(args) -> int``. The work is done by :mod:`unispeech_fast.audio`.

- ``embed``: backbone features per file (mean-pooled, or every frame with ``--pool frames``;
  ``--layer N`` for ``hidden_states[N]``), written as ``<stem>.npy`` files into the ``--output``
  directory, or as one ``.safetensors`` file (one tensor per input, keyed by the path as given).
- ``transcribe``: greedy CTC with the checkpoint's ``vocab.json``; ``<file>\\t<text>`` lines on
  stdout or in ``--output``.
- ``diarize``: RTTM ``SPEAKER`` lines from a frame-classification checkpoint (stdout or ``--output``).
- ``verify-speakers``: x-vector embeddings and their cosine scores; ``<file_a>\\t<file_b>\\t<score>``
  lines (plus ``same``/``different`` with ``--threshold``), the matrix in ``--output`` (``.npy``),
  the embeddings in ``--embeddings`` (``.npy`` or ``.safetensors``).

Failure contract:

- Exit codes (the constants of :mod:`unispeech_fast.cli.common`): 0 every input's result was written;
  1 runtime failure: some inputs failed (the results of all the others were written), or a corrupt
  checkpoint, a forced backend that cannot run, a verify-mode mismatch, an output that could not be
  written; 2 usage error (bad options, a missing checkpoint directory, a checkpoint whose class does
  not fit the command, an output path that is refused, see below). Errors are ``error:`` lines on
  stderr, never a traceback.
- A bad input (missing, unreadable, truncated, too short, samples out of range) does not stop the
  run: headers are read and the end of every file decoded before the model runs, each bad file is
  named with its reason on stderr as it is found, the others run, and the bad ones are listed in a
  JSON failures file (``{"failed": [{"input": ..., "reason": ...}], "succeeded": N, "total": N}``):
  ``--failures FILE``, by default ``failures.json`` inside the ``embed`` output directory or
  ``<output>.failures.json`` beside a file output (none when the results go to stdout and no
  ``--failures`` is given). It is written only when some input failed.
- Outputs are checked before the model runs: an output path that is one of the inputs (AUDIO,
  ``--vocab``, a file of the ``--model`` checkpoint) under any spelling, symlink or hard link is
  refused; so is an existing file (also an existing ``<stem>.npy`` in the ``embed`` directory, or
  the failures file) unless ``--overwrite`` is given; the directory must exist (``embed`` creates
  its output directory, but not one named like a file such as ``x.npy``; ``x.npy/`` asks for it)
  and be writable.

Corpus jobs (``embed``, ``transcribe``, ``diarize`` with ``--manifest FILE|DIR --output DIR``,
:func:`run_corpus`): one result file per input under the output directory, a per-rank done list
in ``DIR/.corpus`` so a rerun skips what is done, the corpus split across torchrun ranks by
duration (:func:`split_by_duration`), and one ``DIR/failures.json`` gathered by rank 0. See
README.md, "Corpus jobs".
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .common import (EXIT_FAILURE, EXIT_OK, EXIT_USAGE, SAMPLE_RATE, backend_from_environment, error, fraction, positive,
                     run_command)

__all__ = ["add_parsers", "run_embed", "run_transcribe", "run_diarize", "run_verify_speakers", "run_corpus",
           "read_manifest", "split_by_duration", "ManifestError", "main"]


def _common(p: argparse.ArgumentParser, corpus: bool = False) -> None:
    from ..dispatch import BACKENDS

    p.add_argument("audio", nargs="*" if corpus else "+", metavar="AUDIO",
                   help="audio files (WAV, FLAC, OGG, ...); mixed down to mono and resampled to 16 kHz")
    if corpus:
        p.add_argument("--manifest", metavar="FILE|DIR", default=None,
                       help="a corpus instead of AUDIO: a fairseq .tsv manifest (first line the root directory, "
                            "then relpath<TAB>num_samples), a .jsonl manifest ({\"path\": ..., \"duration\": "
                            "seconds} per line), or a directory (every audio file below it). Results go to one "
                            "file per input under the --output directory; a rerun skips what is done; under "
                            "torchrun the corpus is split across ranks by duration (see README, Corpus jobs)")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (config.json + weights)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="parameter and input dtype (default: float32)")
    p.add_argument("--backend", choices=("auto",) + tuple(BACKENDS), default=None,
                   help="force a backend (default: $UNISPEECH_FAST_BACKEND, else auto)")
    p.add_argument("--threads", type=positive(int, "--threads"), default=None,
                   help="torch CPU threads (default: torch's default)")
    p.add_argument("--max-batch-seconds", type=positive(float, "--max-batch-seconds"), default=60.0,
                   help="padded audio per batch, in seconds; a longer file runs alone (default: 60)")
    p.add_argument("--max-padding", type=fraction("--max-padding", high_open=True), default=0.15,
                   help="largest padded fraction of a batch (files are sorted by length; default: 0.15)")
    p.add_argument("--exact", action="store_true",
                   help="batch only files of equal length, so every result equals its single-file run "
                        "(matters for group-norm checkpoints, whose padded batches shift the results)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", default=None,
                   help="skip the zero-mean unit-variance normalisation (default: as the checkpoint's "
                        "preprocessor_config.json says, normalising when it is absent)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (default: refuse, before any work is done)")
    p.add_argument("--failures", metavar="FILE", default=None,
                   help="where to write the JSON list of inputs that failed, when some do (default: beside "
                        "the outputs: failures.json in the embed directory, else <output>.failures.json)")


def add_parsers(subparsers) -> None:
    """Add ``embed``, ``transcribe``, ``diarize`` and ``verify-speakers`` to ``subparsers``."""
    p = subparsers.add_parser(
        "embed", help="backbone embeddings of audio files (.npy or .safetensors)",
        description="Run the checkpoint's backbone on each file and write its last_hidden_state "
                    "(or hidden_states[--layer]), mean-pooled over the file's frames or every frame.")
    _common(p, corpus=True)
    p.add_argument("--output", "-o", required=True, metavar="PATH",
                   help="a directory (one <stem>.npy per file) or a .safetensors file (one tensor per file)")
    p.add_argument("--pool", choices=("mean", "frames"), default="mean",
                   help="mean: one vector per file; frames: [frames, hidden] per file (default: mean)")
    p.add_argument("--layer", type=int, default=None, metavar="N",
                   help="hidden_states[N] instead of last_hidden_state (0 = encoder input)")
    p.set_defaults(func=run_embed)

    p = subparsers.add_parser(
        "transcribe", help="greedy CTC transcripts (a *ForCTC checkpoint with vocab.json)",
        description="Greedy CTC decoding: argmax per frame, repeats collapsed, the blank "
                    "(config.pad_token_id) dropped, '|' read as a space.")
    _common(p, corpus=True)
    p.add_argument("--vocab", metavar="FILE", default=None, help="vocab.json (default: the checkpoint's)")
    p.add_argument("--output", "-o", metavar="FILE", default=None,
                   help="write '<file>\\t<text>' lines here instead of stdout")
    p.set_defaults(func=run_transcribe)

    p = subparsers.add_parser(
        "diarize", help="speaker-activity segments as RTTM (a *ForAudioFrameClassification checkpoint)",
        description="Per-frame sigmoid of each label > --threshold gives the label's segments, written "
                    "as RTTM SPEAKER lines.")
    _common(p, corpus=True)
    p.add_argument("--threshold", type=fraction("--threshold", high_open=False), default=0.5,
                   help="activity threshold on the sigmoid (default: 0.5)")
    p.add_argument("--output", "-o", metavar="FILE", default=None, help="write the RTTM here instead of stdout")
    p.set_defaults(func=run_diarize)

    p = subparsers.add_parser(
        "verify-speakers", help="x-vector cosine scores between audio files (a *ForXVector checkpoint)",
        description="Embed each file with the x-vector head and print the cosine score of every pair.")
    _common(p)
    p.add_argument("--threshold", type=fraction("--threshold", high_open=False), default=None,
                   help="also print 'same' (score >= threshold) or 'different' per pair")
    p.add_argument("--output", "-o", metavar="FILE", default=None, help="write the score matrix here (.npy)")
    p.add_argument("--embeddings", metavar="FILE", default=None,
                   help="write the embeddings here (.npy [files, dim], or .safetensors keyed by file)")
    p.set_defaults(func=run_verify_speakers)


# ============================================================================================ helpers
class _ReportedFailures(dict):
    """``input -> reason``; each failure is printed as an ``error:`` line on stderr when it is found."""

    def __setitem__(self, key: str, reason: str) -> None:
        print(f"error: {reason}", file=sys.stderr, flush=True)
        super().__setitem__(key, reason)


def _run_task(args: argparse.Namespace, task: Callable[..., int], failures: dict | None = None) -> int:
    """Common setup (device, threads, backend, model) and the mapping of errors to exit codes.
    ``failures`` (default: a new :class:`_ReportedFailures`) is passed to ``task`` in its options."""
    import torch

    from .. import audio
    from ..configuration import ConfigError
    from ..dispatch import BackendNotSupportedError, VerificationError, backend
    from ..loading import CheckpointError

    if args.device == "cuda" and not torch.cuda.is_available():
        return error("--device cuda: CUDA is not available here (see `python -m unispeech_fast info`)", EXIT_USAGE)
    if getattr(args, "manifest", None) is None and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        # every rank would run every file and write the same outputs: only corpus jobs are split
        return error(f"$WORLD_SIZE is {os.environ['WORLD_SIZE']} (torchrun): give the inputs as --manifest FILE|DIR "
                      "with --output DIR so the ranks split them (embed, transcribe, diarize)", EXIT_USAGE)
    problem = backend_from_environment(args)
    if problem is not None:
        return error(problem, EXIT_USAGE)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model = audio.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    except audio.ModelMismatchError as exc:
        return error(str(exc), EXIT_USAGE)
    except FileNotFoundError as exc:  # no such directory (and not a hub id that could be fetched)
        return error(f"--model {args.model}: {exc}", EXIT_USAGE)
    except (CheckpointError, ConfigError, OSError) as exc:
        return error(f"cannot load --model {args.model}: {exc}", EXIT_FAILURE)
    options = dict(max_batch_seconds=args.max_batch_seconds, max_padding=args.max_padding, exact=args.exact,
                   normalize=args.normalize, progress=not args.quiet,
                   failures=_ReportedFailures() if failures is None else failures)
    try:
        with backend(args.backend):
            return task(model, options)
    except audio.ModelMismatchError as exc:
        return error(str(exc), EXIT_USAGE)
    except audio.AudioError as exc:
        return error(str(exc), EXIT_FAILURE)
    except BackendNotSupportedError as exc:
        return error(str(exc), EXIT_FAILURE)
    except VerificationError as exc:
        return error(f"verify mode: {exc}", EXIT_FAILURE)


def _same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` name one file: the same path under any spelling or symlink, or, when both exist,
    the same file identity (device and inode: a hard link, which writing ``a`` would write through)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): no identity to share
        return False


def _check_inputs(args: argparse.Namespace) -> str | None:
    """The same AUDIO file twice (under any spelling) is refused: its results could not be told apart."""
    seen: dict[str, str] = {}
    for path in args.audio:
        key = os.path.realpath(path)
        if key in seen:
            return f"the same AUDIO file is given twice ({seen[key]} and {path})"
        seen[key] = path
    return None


def _check_writable_dir(directory: str, flag: str, path: str, create: bool = False) -> str | None:
    """``directory`` (or, with ``create``, its nearest existing ancestor) is a writable directory."""
    d = directory
    if create:
        while not os.path.lexists(d) and os.path.dirname(d) != d:
            d = os.path.dirname(d)
    if not os.path.exists(d):
        return f"{flag} {path}: the directory {d} does not exist"
    if not os.path.isdir(d):
        return f"{flag} {path}: {d} is not a directory"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"{flag} {path}: the directory {d} is not writable"
    return None


def _is_an_input(path: str, flag: str, args: argparse.Namespace) -> str | None:
    """An output path naming an input (AUDIO, ``--vocab``, a file of the ``--model`` checkpoint) is refused."""
    protected = list(args.audio) + [p for p in (getattr(args, "vocab", None),) if p]
    model_dir = getattr(args, "model", None)
    if model_dir and os.path.isdir(model_dir):  # the checkpoint's own files (config.json, weights, vocab.json)
        protected += [os.path.join(model_dir, name) for name in os.listdir(model_dir)]
    for source in protected:
        if _same_file(path, source):
            return f"{flag} {path} is one of the inputs ({source}); refusing to overwrite it"
    return None


def _check_output_file(path: str | None, flag: str, args: argparse.Namespace, check_dir: bool = True) -> str | None:
    """An output file the run may write: not an input, not a directory, not an existing file unless
    ``--overwrite`` (then it must be writable), in an existing writable directory (``check_dir``;
    ``embed`` checks its output directory, which it may create, itself)."""
    if path is None:
        return None
    problem = _is_an_input(path, flag, args)
    if problem:
        return problem
    if os.path.isdir(path):
        return f"{flag} {path} is a directory; give a file name"
    if os.path.lexists(path):
        if not args.overwrite:
            return f"{flag} {path} already exists; pass --overwrite to replace it"
        if not os.access(path, os.W_OK):
            return f"{flag} {path} exists and is not writable"
        return None
    return _check_writable_dir(os.path.dirname(os.path.abspath(path)), flag, path) if check_dir else None


def _check_outputs(args: argparse.Namespace, outputs: Sequence[tuple[str, str | None]],
                   check_dir: bool = True) -> str | None:
    """Every ``(flag, path)`` passes :func:`_check_output_file`, and no two name the same file."""
    named = [(flag, path) for flag, path in outputs if path is not None]
    for k, (flag, path) in enumerate(named):
        problem = _check_output_file(path, flag, args, check_dir)
        if problem:
            return problem
        for other_flag, other in named[:k]:
            if _same_file(path, other):
                return f"{flag} and {other_flag} name the same file {path}"
    return None


# names that end like a file: an output directory with one of these suffixes is almost surely a mistake
_FILE_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".bin", ".ckpt", ".h5", ".hdf5", ".pkl", ".pickle", ".json",
                  ".jsonl", ".txt", ".tsv", ".csv", ".rttm", ".parquet", ".arrow", ".mat", ".ark", ".scp", ".wav",
                  ".flac", ".ogg", ".mp3")


def _file_like_directory(out: str, what: str) -> str | None:
    """An output directory that does not exist yet and whose name ends in a file suffix (``x.npy``) is refused:
    it would be created as a directory of that name. ``x.npy/`` (a trailing separator) asks for it."""
    suffix = os.path.splitext(out)[1].lower()
    if suffix in _FILE_SUFFIXES and not out.endswith(os.sep) and not os.path.isdir(out):
        return (f"--output {out}: {what}; a name ending in {suffix} would become a directory of that name "
                f"(write {out}{os.sep} if that is what you want)")
    return None


def _default_failures_path(args: argparse.Namespace, output: str | None) -> str | None:
    if args.failures is not None:
        return args.failures
    return None if output is None else output + ".failures.json"


def _is_corpus_job(args: argparse.Namespace) -> bool:
    """A corpus job: ``--manifest`` given, or no AUDIO file (the corpus code then says what is missing)."""
    return getattr(args, "manifest", None) is not None or not args.audio


def _corpus_job_or_check_files(args: argparse.Namespace, command: str, outputs: Sequence[tuple[str, str | None]],
           failures_next_to: str | None) -> tuple[str | None, int | None]:
    """What a file command does before loading a model: a corpus job (:func:`_is_corpus_job`) runs as one, else
    :func:`_check_files`. Returns ``(failures path, None)`` to go on, or ``(None, exit code)``."""
    if _is_corpus_job(args):
        return None, run_corpus(args, command)
    return _check_files(args, outputs, failures_next_to)


def _check_files(args: argparse.Namespace, outputs: Sequence[tuple[str, str | None]],
                 failures_next_to: str | None) -> tuple[str | None, int | None]:
    """The usage checks of a file command before any model loads: the AUDIO inputs, then each ``(flag, path)`` of
    ``outputs`` and the failures list (``--failures``, by default next to ``failures_next_to``).

    Returns ``(failures path, None)``, or ``(None, EXIT_USAGE)`` once the problem is printed."""
    failures_path = _default_failures_path(args, failures_next_to)
    problem = _check_inputs(args) or _check_outputs(args, [*outputs, ("--failures", failures_path)])
    if problem:
        return None, error(problem, EXIT_USAGE)
    return failures_path, None


def _write_or_fail(write: Callable[[], None], what: str) -> int | None:
    """Run ``write``; an ``OSError`` becomes an ``error:`` line and :data:`EXIT_FAILURE`."""
    try:
        write()
    except OSError as exc:
        return error(f"cannot write {what}: {exc}", EXIT_FAILURE)
    return None


def _finish(args: argparse.Namespace, failures: dict[str, str], failures_path: str | None,
            written: bool = True) -> int:
    """Write the failures list (when some input failed) and return the exit code."""
    import json

    total = len(args.audio)
    if not failures:
        if failures_path is not None and args.overwrite and os.path.isfile(failures_path):
            os.remove(failures_path)  # a stale list from an earlier run would describe this one wrongly
        return EXIT_OK
    where = ""
    if failures_path is not None:
        record = {"failed": [{"input": k, "reason": v} for k, v in failures.items()],
                  "succeeded": total - len(failures), "total": total}

        def write() -> None:
            with open(failures_path, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
                f.write("\n")

        code = _write_or_fail(write, f"the failures list {failures_path}")
        if code is not None:
            return code
        where = f" (listed in {failures_path})"
    done = total - len(failures) if written else 0
    return error(f"{len(failures)} of {total} input(s) failed{where}; "
                  + (f"the results of the other {done} were written" if done else "no results were written"),
                  EXIT_FAILURE)


def _write_lines_and_finish(args: argparse.Namespace, lines: Sequence[str], any_result: bool, failures: dict[str, str],
                            failures_path: str | None) -> int:
    """Write ``lines`` to ``--output`` (stdout without one) if ``any_result`` or there is no ``--output``, then
    :func:`_finish`; a failed write is the exit code."""
    if any_result or args.output is None:
        code = _write_or_fail(lambda: _write_lines(lines, args.output), f"--output {args.output}")
        if code is not None:
            return code
    return _finish(args, failures, failures_path)


def _write_lines(lines: Sequence[str], output: str | None) -> None:
    text = "".join(line + "\n" for line in lines)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)


def _npy_names(paths: Sequence[str]) -> dict[str, str] | str:
    """``<stem>.npy`` per input, or an error message when two inputs share a stem."""
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for p in paths:
        name = os.path.splitext(os.path.basename(p))[0] + ".npy"
        if name in seen and seen[name] != p:
            return (f"{seen[name]} and {p} would both be written as {name}; write a .safetensors file "
                    "instead (keyed by the full path) or rename one")
        seen[name] = p
        names[p] = name
    return names


def _save_safetensors(tensors: dict, path: str) -> None:
    import numpy as np
    import torch
    from ..loading import save_safetensors

    save_safetensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, path)


# ============================================================================================ commands
def run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    if _is_corpus_job(args):
        return run_corpus(args, "embed")

    from .. import audio

    problem = _check_inputs(args)
    if problem:
        return error(problem, EXIT_USAGE)
    out = args.output
    problem = _is_an_input(out, "--output", args)
    if problem:
        return error(problem, EXIT_USAGE)
    as_safetensors = out.endswith(".safetensors")
    if as_safetensors:
        failures_path = _default_failures_path(args, out)
        problem = _check_outputs(args, [("--output", out), ("--failures", failures_path)])
        if problem:
            return error(problem, EXIT_USAGE)
    else:
        if os.path.exists(out) and not os.path.isdir(out):
            return error(f"--output {out} exists and is not a directory (a .safetensors name writes one file)",
                          EXIT_USAGE)
        problem = _file_like_directory(out, "embed writes a directory (one <stem>.npy per file) or one .safetensors "
                                            "file (a name ending in .safetensors)")
        if problem:
            return error(problem, EXIT_USAGE)
        names = _npy_names(args.audio)
        if isinstance(names, str):
            return error(names, EXIT_USAGE)
        problem = _check_writable_dir(os.path.abspath(out), "--output", out, create=True)
        if problem:
            return error(problem, EXIT_USAGE)
        failures_path = args.failures if args.failures is not None else os.path.join(out, "failures.json")
        npy_files = [os.path.join(out, names[p]) for p in args.audio]
        problem = (_check_outputs(args, [("--output", f) for f in npy_files], check_dir=False)
                   or _check_output_file(failures_path, "--failures", args, check_dir=args.failures is not None))
        if not problem and any(_same_file(failures_path, f) for f in npy_files):
            problem = f"--failures {failures_path} is also one of the .npy outputs"
        if problem:
            return error(problem, EXIT_USAGE)

    def task(model, options):
        n_layers = model.config.num_hidden_layers
        if args.layer is not None and not -(n_layers + 1) <= args.layer <= n_layers:
            return error(f"--layer {args.layer}: this checkpoint has hidden_states 0..{n_layers} "
                          f"(or negative from the end)", EXIT_USAGE)
        vectors = audio.embed(model, args.audio, layer=args.layer, pool=args.pool, **options)
        done = [(path, vec) for path, vec in zip(args.audio, vectors) if vec is not None]

        def write() -> None:
            if not as_safetensors:  # created even when every input failed: the failures list goes there
                os.makedirs(out, exist_ok=True)
            if not done:
                return
            if as_safetensors:
                _save_safetensors(dict(done), out)
            else:
                for path, vec in done:
                    np.save(os.path.join(out, names[path]), vec)

        code = _write_or_fail(write, f"--output {out}")
        return code if code is not None else _finish(args, options["failures"], failures_path)

    return _run_task(args, task)


def run_transcribe(args: argparse.Namespace) -> int:
    from .. import audio

    failures_path, code = _corpus_job_or_check_files(args, "transcribe", [("--output", args.output)], args.output)
    if code is not None:
        return code

    def task(model, options):
        audio._require_head(model, "ForCTC", "transcribe")
        vocab_path = args.vocab or os.path.join(model.checkpoint_dir, "vocab.json")
        try:
            vocab = audio.load_vocab(vocab_path)
        except (OSError, ValueError) as exc:
            return error(f"{exc}" + ("" if args.vocab else " (pass --vocab FILE)"), EXIT_USAGE)
        texts = audio.transcribe(model, args.audio, vocab=vocab, **options)
        lines = [f"{p}\t{t}" for p, t in zip(args.audio, texts) if t is not None]
        return _write_lines_and_finish(args, lines, bool(lines), options["failures"], failures_path)

    return _run_task(args, task)


def run_diarize(args: argparse.Namespace) -> int:
    from .. import audio

    failures_path, code = _corpus_job_or_check_files(args, "diarize", [("--output", args.output)], args.output)
    if code is not None:
        return code
    ids: dict[str, str] = {}
    for path in args.audio:  # RTTM lines carry only the recording id: it must tell the files apart
        file_id = audio.rttm_file_id(os.path.splitext(os.path.basename(path))[0])
        if file_id in ids:
            return error(f"{ids[file_id]} and {path} would both be recording {file_id!r} in the RTTM, so their "
                          "segments could not be told apart; rename one or diarize them in separate runs",
                          EXIT_USAGE)
        ids[file_id] = path

    def task(model, options):
        segments = audio.diarize(model, args.audio, threshold=args.threshold, **options)
        lines = []
        for (file_id, path), segs in zip(ids.items(), segments):
            if segs is not None:
                lines += audio.rttm_lines(file_id, segs)
        any_done = len(options["failures"]) < len(args.audio)
        return _write_lines_and_finish(args, lines, any_done, options["failures"], failures_path)

    return _run_task(args, task)


def run_verify_speakers(args: argparse.Namespace) -> int:
    import numpy as np

    from .. import audio

    if len(args.audio) < 2:
        return error("verify-speakers compares files: give at least two AUDIO files", EXIT_USAGE)
    failures_path, code = _check_files(args, [("--output", args.output), ("--embeddings", args.embeddings)],
                                       args.output or args.embeddings)
    if code is not None:
        return code
    if args.embeddings is not None and not args.embeddings.endswith((".npy", ".safetensors")):
        return error(f"--embeddings {args.embeddings}: the name must end in .npy or .safetensors", EXIT_USAGE)

    def task(model, options):
        rows = audio._xvector_rows(model, args.audio, **options)
        good = [k for k, row in enumerate(rows) if row is not None]
        if len(good) < 2:  # (some input failed: all were given as at least two files)
            error(f"fewer than two usable AUDIO files ({len(good)}); there is nothing to compare", EXIT_FAILURE)
            return _finish(args, options["failures"], failures_path, written=False)
        names = [args.audio[k] for k in good]
        emb = np.stack([rows[k] for k in good])
        scores = audio.cosine_scores(emb)

        def write() -> None:
            if args.output is not None:
                _save_npy(args.output, scores)
            if args.embeddings is not None:
                if args.embeddings.endswith(".safetensors"):
                    _save_safetensors(dict(zip(names, emb)), args.embeddings)
                else:
                    _save_npy(args.embeddings, emb)

        code = _write_or_fail(write, "--output/--embeddings")
        if code is not None:
            return code
        lines = []
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                line = f"{names[i]}\t{names[j]}\t{scores[i, j]:.6f}"
                if args.threshold is not None:
                    line += "\t" + ("same" if scores[i, j] >= args.threshold else "different")
                lines.append(line)
        _write_lines(lines, None)
        return _finish(args, options["failures"], failures_path)

    return _run_task(args, task)


def _save_npy(path: str, array) -> None:
    """``np.save`` to exactly ``path`` (numpy would append .npy to other names)."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, array)


# ============================================================================================ corpus jobs
_STATE_DIR = ".corpus"  # inside the --output directory: job.json and the per-rank done lists
_RESULT_SUFFIX = {"embed": ".npy", "transcribe": ".txt", "diarize": ".rttm"}


class ManifestError(ValueError):
    """A manifest (or corpus directory) that cannot be read; the message names the file and line."""


def _audio_extensions() -> set[str]:
    from .. import audio

    exts = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf", ".rf64"}
    try:
        exts |= {"." + k.lower() for k in audio._soundfile().available_formats()}
    except Exception:  # soundfile missing: the run reports it per file
        pass
    return exts


def read_manifest(source: str) -> tuple[str, list[tuple[str, float]]]:
    """``(base, [(path, seconds), ...])`` of a corpus in its listed order.

    - ``*.tsv`` (fairseq): the first line is the root directory, each further line
      ``relpath<TAB>num_samples`` (extra tab-separated columns are ignored); num_samples is read as
      samples at 16 kHz. The paths are joined to the root, which is also ``base``.
    - ``*.jsonl``: one object per line with ``path`` (relative to the manifest's directory, or
      absolute) and ``duration`` (seconds); ``base`` is the manifest's directory.
    - a directory: every file below it with an audio extension, sorted; the duration from the
      file's header (0 where the header cannot be read: the run reports that file).

    Durations only balance the ranks; paths must lie below ``base`` (their relative path names the
    result). Blank lines are skipped; anything else malformed raises :class:`ManifestError`.
    """
    from .. import audio

    entries: list[tuple[str, float]] = []
    if os.path.isdir(source):
        base = source
        exts = _audio_extensions()
        for root, dirs, names in os.walk(source):
            dirs[:] = sorted(d for d in dirs if d != _STATE_DIR)
            for name in sorted(names):
                if os.path.splitext(name)[1].lower() in exts:
                    path = os.path.join(root, name)
                    try:
                        frames, rate, _ = audio.audio_info(path)
                        seconds = frames / rate
                    except audio.AudioError:
                        seconds = 0.0
                    entries.append((path, seconds))
        if not entries:
            raise ManifestError(f"--manifest {source}: no audio files below this directory")
        return base, entries
    if not os.path.isfile(source):
        raise ManifestError(f"--manifest {source}: no such file or directory")
    kind = os.path.splitext(source)[1].lower()
    if kind not in (".tsv", ".jsonl"):
        raise ManifestError(f"--manifest {source}: expected a .tsv or .jsonl manifest, or a directory")
    try:
        with open(source, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"--manifest {source}: cannot read it: {exc}") from None

    def bad(number: int, what: str) -> ManifestError:
        return ManifestError(f"--manifest {source} line {number}: {what}")

    if kind == ".tsv":
        if not lines or not lines[0].strip():
            raise ManifestError(f"--manifest {source}: the first line must be the root directory")
        base = lines[0].strip()
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or not fields[0]:
                raise bad(number, f"expected relpath<TAB>num_samples, got {line!r}")
            try:
                samples = int(fields[1])
            except ValueError:
                raise bad(number, f"num_samples must be an integer, got {fields[1]!r}") from None
            if samples < 0:
                raise bad(number, f"num_samples must be >= 0, got {samples}")
            entries.append((os.path.join(base, fields[0]), samples / SAMPLE_RATE))
    else:
        import json
        import math

        base = os.path.dirname(source) or "."
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise bad(number, f"not JSON: {exc}") from None
            if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
                raise bad(number, "expected an object with a non-empty string \"path\"")
            duration = record.get("duration")
            if isinstance(duration, bool) or not isinstance(duration, (int, float)) \
                    or not math.isfinite(duration) or duration < 0:
                raise bad(number, f"\"duration\" must be a finite number of seconds >= 0, got {duration!r}")
            entries.append((os.path.join(base, record["path"]), float(duration)))
    if not entries:
        raise ManifestError(f"--manifest {source}: it lists no audio files")
    return base, entries


def split_by_duration(seconds: Sequence[float], world_size: int) -> list[list[int]]:
    """Indices per rank, balanced by total duration: longest first (ties in listed order), each onto
    the least-loaded rank (ties to the lowest rank); each rank's indices in listed order. The split
    depends only on the durations and ``world_size``."""
    import heapq

    heap = [(0.0, r) for r in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(seconds)), key=lambda i: (-seconds[i], i)):
        load, rank = heapq.heappop(heap)
        shares[rank].append(i)
        heapq.heappush(heap, (load + seconds[i], rank))
    return [sorted(s) for s in shares]


def _env_int(name: str, default: int, low: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ManifestError(f"${name} must be an integer (as torchrun sets it), got {text!r}") from None
    if value < low:
        raise ManifestError(f"${name} must be >= {low}, got {value}")
    return value


class _Group:
    """RANK/WORLD_SIZE from the environment (torchrun); a gloo process group when WORLD_SIZE > 1."""

    def __init__(self) -> None:
        self.world = _env_int("WORLD_SIZE", 1, 1)
        self.rank = _env_int("RANK", 0, 0)
        self.local_rank = _env_int("LOCAL_RANK", 0, 0)
        if self.rank >= self.world:
            raise ManifestError(f"$RANK {self.rank} is not below $WORLD_SIZE {self.world}")
        self.created = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")  # env:// rendezvous: MASTER_ADDR/MASTER_PORT from torchrun
                self.created = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj):
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _model_fingerprint(args: argparse.Namespace) -> dict[str, str]:
    """A cheap fingerprint of the files the results depend on, ``name -> text``: the small JSON files
    of the ``--model`` directory (config, preprocessor config, vocab, shard indexes) and ``--vocab`` by
    the SHA-256 of their contents; each weights file (``*.safetensors``, ``*.bin``) by its size and
    ``st_mtime_ns``, which any rewrite in place changes (hashing them would read gigabytes on every
    start of every rank; see README, Corpus jobs). A hub id (not a local directory) has no entries."""
    import hashlib

    def digest(path: str) -> str:
        try:
            with open(path, "rb") as f:
                return "sha256 " + hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            return f"unreadable ({exc.strerror})"

    found: dict[str, str] = {}
    if os.path.isdir(args.model):
        for name in sorted(os.listdir(args.model)):
            path = os.path.join(args.model, name)
            if not os.path.isfile(path):
                continue
            if name.endswith(".json"):
                found[name] = digest(path)
            elif name.endswith(_WEIGHT_SUFFIXES):
                st = os.stat(path)
                found[name] = f"size {st.st_size}, mtime_ns {st.st_mtime_ns}"
    if getattr(args, "vocab", None):
        found["--vocab"] = digest(args.vocab)
    return found


def _job_record(args: argparse.Namespace, command: str) -> dict:
    """What fixes the results: a rerun resumes only a job with the same record."""
    return {"command": command, "model": os.path.realpath(args.model), "dtype": args.dtype, "device": args.device,
            "normalize": args.normalize, "exact": args.exact, "max_batch_seconds": args.max_batch_seconds,
            "max_padding": args.max_padding, "layer": getattr(args, "layer", None), "pool": getattr(args, "pool", None),
            "threshold": getattr(args, "threshold", None),
            "vocab": os.path.realpath(args.vocab) if getattr(args, "vocab", None) else None,
            "model_files": _model_fingerprint(args)}


def _differing_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _job_mismatch(old: dict, job: dict) -> str | None:
    """Why a directory's ``job.json`` (``old``) is not this job, or None when it is."""
    if old == job:
        return None
    diff = _differing_keys(old, job)
    why = f"it differs in {', '.join(diff)}"
    if "model_files" in diff and old.get("model") == job["model"]:
        before, now = old["model_files"] if isinstance(old["model_files"], dict) else {}, job["model_files"]
        changed = _differing_keys(before, now)
        why += "; files of the checkpoint (or --vocab) changed since the job started: " + ", ".join(
            f"{n} ({'added' if n not in before else 'removed' if n not in now else 'changed'})" for n in changed)
    return why


def _done_keys(state: str) -> set[str]:
    keys: set[str] = set()
    if os.path.isdir(state):
        for name in os.listdir(state):
            if name.startswith("done.rank") and name.endswith(".txt"):
                with open(os.path.join(state, name), encoding="utf-8") as f:
                    keys.update(line.rstrip("\n") for line in f if line.endswith("\n"))
    return keys


def _atomic_write(path: str, write: Callable[[object], None], binary: bool) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
        write(f)
    os.replace(tmp, path)


def _corpus_setup(args: argparse.Namespace, command: str, group: _Group):
    """Checks of a corpus run (every rank makes them alike): ``(entries, keys, out, state)`` or an
    error ``(message, code)``."""
    import json

    if args.manifest is None:
        return "give AUDIO files or --manifest FILE|DIR", EXIT_USAGE
    if args.audio:
        return "give AUDIO files or --manifest, not both", EXIT_USAGE
    out = getattr(args, "output", None)
    if out is None:
        return f"{command} --manifest needs --output DIR (a directory: one result file per input)", EXIT_USAGE
    if out.endswith(".safetensors") or (os.path.exists(out) and not os.path.isdir(out)):
        return f"--output {out}: with --manifest the output is a directory (one result file per input)", EXIT_USAGE
    problem = _file_like_directory(out, "with --manifest the output is a directory (one result file per input)")
    if problem:
        return problem, EXIT_USAGE
    if args.failures is not None:
        return "--failures: with --manifest the failures list is <output>/failures.json", EXIT_USAGE
    try:
        base, entries = read_manifest(args.manifest)
    except ManifestError as exc:
        return str(exc), EXIT_USAGE
    keys: list[str] = []
    seen: dict[str, str] = {}
    by_result: dict[str, str] = {}
    real_out = os.path.realpath(out)
    for path, _ in entries:
        rel = os.path.relpath(path, base)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
            return (f"--manifest {args.manifest}: {path} is not below {base}; the path relative to it names "
                    "the result file"), EXIT_USAGE
        real = os.path.realpath(path)
        if real in seen:
            return f"--manifest {args.manifest}: the same audio file is listed twice ({seen[real]} and {path})", \
                EXIT_USAGE
        seen[real] = path
        if real == real_out or real.startswith(real_out + os.sep):
            return f"--output {out}: the input {path} lies inside it; choose another directory", EXIT_USAGE
        key = os.path.splitext(rel)[0].replace(os.sep, "/")
        if key in by_result:
            return (f"{by_result[key]} and {path} would both be written as {key}{_RESULT_SUFFIX[command]}; "
                    "rename one or run them separately"), EXIT_USAGE
        by_result[key] = path
        keys.append(key)
    if _is_an_input(out, "--output", args):
        return _is_an_input(out, "--output", args), EXIT_USAGE
    problem = _check_writable_dir(os.path.abspath(out), "--output", out, create=True)
    if problem:
        return problem, EXIT_USAGE
    state = os.path.join(out, _STATE_DIR)
    job = _job_record(args, command)
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        job_file = os.path.join(state, "job.json")
        if not os.path.isfile(job_file):
            return (f"--output {out} is a non-empty directory that holds no corpus job; pass --overwrite to "
                    "write into it or choose another directory"), EXIT_USAGE
        try:
            with open(job_file, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as exc:
            return f"--output {out}: cannot read {job_file}: {exc}; pass --overwrite to start over", EXIT_USAGE
        if not isinstance(old, dict):
            return f"--output {out}: {job_file} holds no JSON object; pass --overwrite to start over", EXIT_USAGE
        if "model_files" not in old:  # written before job.json recorded the checkpoint's fingerprint
            return (f"--output {out}: {job_file} does not record the checkpoint's files (model_files; written by an "
                    "older version), so a resume cannot tell whether the checkpoint changed since; pass --overwrite "
                    "to start over or choose another directory"), EXIT_USAGE
        why = _job_mismatch(old, job)
        if why is not None:
            return (f"--output {out} holds the results of a different job ({why}); "
                    "pass --overwrite to start over or choose another directory"), EXIT_USAGE
    group.barrier()  # every rank has checked the directory before rank 0 writes into it
    if group.rank == 0:
        os.makedirs(state, exist_ok=True)
        if args.overwrite:
            for name in os.listdir(state):
                if name.startswith("done.rank"):
                    os.remove(os.path.join(state, name))
        _atomic_write(os.path.join(state, "job.json"), lambda f: json.dump(job, f, indent=2), binary=False)
    group.barrier()
    return entries, keys, out, state


def run_corpus(args: argparse.Namespace, command: str) -> int:
    """``embed|transcribe|diarize --manifest FILE|DIR --output DIR``, on one process or as one rank
    of a torchrun job (see the module docstring and README, Corpus jobs)."""
    try:
        group = _Group()
    except ManifestError as exc:
        return error(str(exc), EXIT_USAGE)
    try:
        if args.device == "cuda":
            import torch

            if torch.cuda.is_available():  # one GPU per process on a node: cuda means cuda:LOCAL_RANK
                torch.cuda.set_device(group.local_rank % torch.cuda.device_count())
        return _run_corpus(args, command, group)
    finally:
        group.close()


def _run_corpus(args: argparse.Namespace, command: str, group: _Group) -> int:
    import json

    import numpy as np

    from .. import audio

    setup = _corpus_setup(args, command, group)
    if isinstance(setup[0], str):
        return error(setup[0], setup[1])
    entries, keys, out, state = setup
    suffix = _RESULT_SUFFIX[command]
    share = split_by_duration([sec for _, sec in entries], group.world)[group.rank]
    done = set() if args.overwrite else _done_keys(state)
    todo = [i for i in share if not (keys[i] in done and os.path.isfile(os.path.join(out, keys[i] + suffix)))]
    done_list = os.path.join(state, f"done.rank{group.rank}-of-{group.world}.txt")

    def task(model, options):
        vocab = None
        if command == "transcribe":
            audio._require_head(model, "ForCTC", "transcribe")
            vocab_path = args.vocab or os.path.join(model.checkpoint_dir, "vocab.json")
            try:
                vocab = audio.load_vocab(vocab_path)
            except (OSError, ValueError) as exc:
                return error(f"{exc}" + ("" if args.vocab else " (pass --vocab FILE)"), EXIT_USAGE)
        elif command == "embed":
            n_layers = model.config.num_hidden_layers
            if args.layer is not None and not -(n_layers + 1) <= args.layer <= n_layers:
                return error(f"--layer {args.layer}: this checkpoint has hidden_states 0..{n_layers} "
                              f"(or negative from the end)", EXIT_USAGE)
        failures = options["failures"]
        # the model sees this rank's files batch by batch, as one run would batch them; each result is
        # written (atomically) and its key appended to this rank's done list as soon as it exists
        lengths = []
        for i in todo:
            try:
                frames, rate, _ = audio.audio_info(entries[i][0])
                lengths.append(-(-frames * SAMPLE_RATE // rate))
            except audio.AudioError:
                lengths.append(0)  # reported by the run below
        batches = audio.plan_batches(lengths, max(1, int(args.max_batch_seconds * SAMPLE_RATE)),
                                     args.max_padding, args.exact) if todo else []
        bar = audio.Progress(sum(lengths), f"{command} rank {group.rank}", len(todo),
                             enabled=options["progress"] and group.rank == 0)
        run_options = dict(options, progress=bar)
        try:
            with open(done_list, "a", encoding="utf-8") as listing:
                for batch in batches:
                    paths = [entries[todo[b]][0] for b in batch]
                    if command == "embed":
                        results = audio.embed(model, paths, layer=args.layer, pool=args.pool, **run_options)
                    elif command == "transcribe":
                        results = audio.transcribe(model, paths, vocab=vocab, **run_options)
                    else:
                        results = audio.diarize(model, paths, threshold=args.threshold, **run_options)
                    for b, result in zip(batch, results):
                        if result is None:
                            continue
                        key = keys[todo[b]]
                        target = os.path.join(out, key + suffix)
                        if command == "embed":
                            _atomic_write(target, lambda f: np.save(f, result), binary=True)
                        elif command == "transcribe":
                            _atomic_write(target, lambda f: f.write(result + "\n"), binary=False)
                        else:
                            text = "".join(line + "\n" for line in audio.rttm_lines(key, result))
                            _atomic_write(target, lambda f: f.write(text), binary=False)
                        listing.write(key + "\n")
                        listing.flush()
        except OSError as exc:
            return error(f"cannot write --output {out}: {exc}", EXIT_FAILURE)
        finally:
            bar.close()
        return EXIT_OK

    mine = _ReportedFailures()
    code = _run_task(args, task, failures=mine)
    # every rank reaches this point (a rank that raised is ended by torchrun, which stops the others):
    # the failures of all ranks are gathered, in the corpus's order, into one list written by rank 0
    gathered = group.all_gather((code, dict(mine)))
    codes = [c for c, _ in gathered]
    if any(c != EXIT_OK for c in codes):
        return max(codes)
    failed: dict[str, str] = {}
    for _, f in gathered:
        failed.update(f)
    order = {path: k for k, (path, _) in enumerate(entries)}
    failed = dict(sorted(failed.items(), key=lambda kv: order.get(kv[0], len(order))))
    failures_path = os.path.join(out, "failures.json")
    if group.rank != 0:
        return EXIT_OK if not failed else EXIT_FAILURE
    total = len(entries)
    if not failed:
        if os.path.isfile(failures_path):
            os.remove(failures_path)  # a list from an earlier (resumed) run would describe this one wrongly
        return EXIT_OK
    record = {"failed": [{"input": k, "reason": v} for k, v in failed.items()],
              "succeeded": total - len(failed), "total": total}
    code = _write_or_fail(lambda: _atomic_write(
        failures_path, lambda f: (json.dump(record, f, indent=2), f.write("\n")), binary=False),
        f"the failures list {failures_path}")
    if code is not None:
        return code
    return error(f"{len(failed)} of {total} input(s) failed (listed in {failures_path}); the results of the other "
                  f"{total - len(failed)} are in {out} (a rerun retries the failed ones and skips the rest)",
                  EXIT_FAILURE)


# ============================================================================================ standalone
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unispeech-fast", description="Inference on audio files.")
    add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with only the file commands and run one (``python -m unispeech_fast.audio_cli``)."""
    return run_command(build_parser(), argv)

if __name__ == "__main__":
    raise SystemExit(main())
