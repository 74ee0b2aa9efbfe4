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

- Exit codes (the constants of :mod:`unispeech_fast.cli`): 0 every input's result was written;
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
  ``--vocab``, a file of the ``--model`` checkpoint) is refused; so is an existing file (also an
  existing ``<stem>.npy`` in the ``embed`` directory, or the failures file) unless ``--overwrite``
  is given; the directory must exist (``embed`` creates its output directory) and be writable.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

__all__ = ["add_parsers", "run_embed", "run_transcribe", "run_diarize", "run_verify_speakers", "main"]

from .cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def _fraction(name: str, high_open: bool):
    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (0.0 <= value < 1.0 if high_open else 0.0 <= value <= 1.0):
            raise argparse.ArgumentTypeError(f"{name} must be in [0, {'1)' if high_open else '1]'}, got {text!r}")
        return value

    return parse


def _common(p: argparse.ArgumentParser) -> None:
    from .cli import _positive  # imported here: cli imports this module to add these commands
    from .dispatch import BACKENDS

    p.add_argument("audio", nargs="+", metavar="AUDIO",
                   help="audio files (WAV, FLAC, OGG, ...); mixed down to mono and resampled to 16 kHz")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (config.json + weights)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="parameter and input dtype (default: float32)")
    p.add_argument("--backend", choices=("auto",) + tuple(BACKENDS), default=None,
                   help="force a backend (default: $UNISPEECH_FAST_BACKEND, else auto)")
    p.add_argument("--threads", type=_positive(int, "--threads"), default=None,
                   help="torch CPU threads (default: torch's default)")
    p.add_argument("--max-batch-seconds", type=_positive(float, "--max-batch-seconds"), default=60.0,
                   help="padded audio per batch, in seconds; a longer file runs alone (default: 60)")
    p.add_argument("--max-padding", type=_fraction("--max-padding", high_open=True), default=0.15,
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
    _common(p)
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
    _common(p)
    p.add_argument("--vocab", metavar="FILE", default=None, help="vocab.json (default: the checkpoint's)")
    p.add_argument("--output", "-o", metavar="FILE", default=None,
                   help="write '<file>\\t<text>' lines here instead of stdout")
    p.set_defaults(func=run_transcribe)

    p = subparsers.add_parser(
        "diarize", help="speaker-activity segments as RTTM (a *ForAudioFrameClassification checkpoint)",
        description="Per-frame sigmoid of each label > --threshold gives the label's segments, written "
                    "as RTTM SPEAKER lines.")
    _common(p)
    p.add_argument("--threshold", type=_fraction("--threshold", high_open=False), default=0.5,
                   help="activity threshold on the sigmoid (default: 0.5)")
    p.add_argument("--output", "-o", metavar="FILE", default=None, help="write the RTTM here instead of stdout")
    p.set_defaults(func=run_diarize)

    p = subparsers.add_parser(
        "verify-speakers", help="x-vector cosine scores between audio files (a *ForXVector checkpoint)",
        description="Embed each file with the x-vector head and print the cosine score of every pair.")
    _common(p)
    p.add_argument("--threshold", type=_fraction("--threshold", high_open=False), default=None,
                   help="also print 'same' (score >= threshold) or 'different' per pair")
    p.add_argument("--output", "-o", metavar="FILE", default=None, help="write the score matrix here (.npy)")
    p.add_argument("--embeddings", metavar="FILE", default=None,
                   help="write the embeddings here (.npy [files, dim], or .safetensors keyed by file)")
    p.set_defaults(func=run_verify_speakers)


# ============================================================================================ helpers
def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


class _ReportedFailures(dict):
    """``input -> reason``; each failure is printed as an ``error:`` line on stderr when it is found."""

    def __setitem__(self, key: str, reason: str) -> None:
        print(f"error: {reason}", file=sys.stderr, flush=True)
        super().__setitem__(key, reason)


def _run_task(args: argparse.Namespace, task: Callable[..., int]) -> int:
    """Common setup (device, threads, backend, model) and the mapping of errors to exit codes."""
    import torch

    from . import audio
    from .configuration import ConfigError
    from .dispatch import BackendNotSupportedError, VerificationError, backend, current_backend
    from .loading import CheckpointError

    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: CUDA is not available here (see `python -m unispeech_fast info`)", EXIT_USAGE)
    if args.backend is None:
        try:
            args.backend = current_backend()
        except ValueError as exc:  # a bad $UNISPEECH_FAST_BACKEND
            return _error(str(exc), EXIT_USAGE)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model = audio.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    except audio.ModelMismatchError as exc:
        return _error(str(exc), EXIT_USAGE)
    except FileNotFoundError as exc:  # no such directory (and not a hub id that could be fetched)
        return _error(f"--model {args.model}: {exc}", EXIT_USAGE)
    except (CheckpointError, ConfigError, OSError) as exc:
        return _error(f"cannot load --model {args.model}: {exc}", EXIT_FAILURE)
    options = dict(max_batch_seconds=args.max_batch_seconds, max_padding=args.max_padding, exact=args.exact,
                   normalize=args.normalize, progress=not args.quiet, failures=_ReportedFailures())
    try:
        with backend(args.backend):
            return task(model, options)
    except audio.ModelMismatchError as exc:
        return _error(str(exc), EXIT_USAGE)
    except audio.AudioError as exc:
        return _error(str(exc), EXIT_FAILURE)
    except BackendNotSupportedError as exc:
        return _error(str(exc), EXIT_FAILURE)
    except VerificationError as exc:
        return _error(f"verify mode: {exc}", EXIT_FAILURE)


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


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


def _default_failures_path(args: argparse.Namespace, output: str | None) -> str | None:
    if args.failures is not None:
        return args.failures
    return None if output is None else output + ".failures.json"


def _write_or_fail(write: Callable[[], None], what: str) -> int | None:
    """Run ``write``; an ``OSError`` becomes an ``error:`` line and :data:`EXIT_FAILURE`."""
    try:
        write()
    except OSError as exc:
        return _error(f"cannot write {what}: {exc}", EXIT_FAILURE)
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
    return _error(f"{len(failures)} of {total} input(s) failed{where}; "
                  + (f"the results of the other {done} were written" if done else "no results were written"),
                  EXIT_FAILURE)


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
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, path)


# ============================================================================================ commands
def run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from . import audio

    problem = _check_inputs(args)
    if problem:
        return _error(problem, EXIT_USAGE)
    out = args.output
    problem = _is_an_input(out, "--output", args)
    if problem:
        return _error(problem, EXIT_USAGE)
    as_safetensors = out.endswith(".safetensors")
    if as_safetensors:
        failures_path = _default_failures_path(args, out)
        problem = _check_outputs(args, [("--output", out), ("--failures", failures_path)])
        if problem:
            return _error(problem, EXIT_USAGE)
    else:
        if os.path.exists(out) and not os.path.isdir(out):
            return _error(f"--output {out} exists and is not a directory (a .safetensors name writes one file)",
                          EXIT_USAGE)
        names = _npy_names(args.audio)
        if isinstance(names, str):
            return _error(names, EXIT_USAGE)
        problem = _check_writable_dir(os.path.abspath(out), "--output", out, create=True)
        if problem:
            return _error(problem, EXIT_USAGE)
        failures_path = args.failures if args.failures is not None else os.path.join(out, "failures.json")
        npy_files = [os.path.join(out, names[p]) for p in args.audio]
        problem = (_check_outputs(args, [("--output", f) for f in npy_files], check_dir=False)
                   or _check_output_file(failures_path, "--failures", args, check_dir=args.failures is not None))
        if not problem and any(_same_file(failures_path, f) for f in npy_files):
            problem = f"--failures {failures_path} is also one of the .npy outputs"
        if problem:
            return _error(problem, EXIT_USAGE)

    def task(model, options):
        n_layers = model.config.num_hidden_layers
        if args.layer is not None and not -(n_layers + 1) <= args.layer <= n_layers:
            return _error(f"--layer {args.layer}: this checkpoint has hidden_states 0..{n_layers} "
                          f"(or negative from the end)", EXIT_USAGE)
        vectors = audio.embed(model, args.audio, layer=args.layer, pool=args.pool, **options)
        done = [(path, vec) for path, vec in zip(args.audio, vectors) if vec is not None]

        def write() -> None:
            if not done:
                return
            if as_safetensors:
                _save_safetensors(dict(done), out)
            else:
                os.makedirs(out, exist_ok=True)
                for path, vec in done:
                    np.save(os.path.join(out, names[path]), vec)

        code = _write_or_fail(write, f"--output {out}")
        return code if code is not None else _finish(args, options["failures"], failures_path)

    return _run_task(args, task)


def run_transcribe(args: argparse.Namespace) -> int:
    from . import audio

    failures_path = _default_failures_path(args, args.output)
    problem = _check_inputs(args) or _check_outputs(args, [("--output", args.output), ("--failures", failures_path)])
    if problem:
        return _error(problem, EXIT_USAGE)

    def task(model, options):
        audio._require_head(model, "ForCTC", "transcribe")
        vocab_path = args.vocab or os.path.join(model.checkpoint_dir, "vocab.json")
        try:
            vocab = audio.load_vocab(vocab_path)
        except (OSError, ValueError) as exc:
            return _error(f"{exc}" + ("" if args.vocab else " (pass --vocab FILE)"), EXIT_USAGE)
        texts = audio.transcribe(model, args.audio, vocab=vocab, **options)
        lines = [f"{p}\t{t}" for p, t in zip(args.audio, texts) if t is not None]
        if lines or args.output is None:
            code = _write_or_fail(lambda: _write_lines(lines, args.output), f"--output {args.output}")
            if code is not None:
                return code
        return _finish(args, options["failures"], failures_path)

    return _run_task(args, task)


def run_diarize(args: argparse.Namespace) -> int:
    from . import audio

    failures_path = _default_failures_path(args, args.output)
    problem = _check_inputs(args) or _check_outputs(args, [("--output", args.output), ("--failures", failures_path)])
    if problem:
        return _error(problem, EXIT_USAGE)
    ids: dict[str, str] = {}
    for path in args.audio:  # RTTM lines carry only the recording id: it must tell the files apart
        file_id = audio.rttm_file_id(os.path.splitext(os.path.basename(path))[0])
        if file_id in ids:
            return _error(f"{ids[file_id]} and {path} would both be recording {file_id!r} in the RTTM, so their "
                          "segments could not be told apart; rename one or diarize them in separate runs",
                          EXIT_USAGE)
        ids[file_id] = path

    def task(model, options):
        segments = audio.diarize(model, args.audio, threshold=args.threshold, **options)
        lines = []
        for (file_id, path), segs in zip(ids.items(), segments):
            if segs is not None:
                lines += audio.rttm_lines(file_id, segs)
        if len(options["failures"]) < len(args.audio) or args.output is None:
            code = _write_or_fail(lambda: _write_lines(lines, args.output), f"--output {args.output}")
            if code is not None:
                return code
        return _finish(args, options["failures"], failures_path)

    return _run_task(args, task)


def run_verify_speakers(args: argparse.Namespace) -> int:
    import numpy as np

    from . import audio

    if len(args.audio) < 2:
        return _error("verify-speakers compares files: give at least two AUDIO files", EXIT_USAGE)
    failures_path = _default_failures_path(args, args.output or args.embeddings)
    problem = _check_inputs(args) or _check_outputs(
        args, [("--output", args.output), ("--embeddings", args.embeddings), ("--failures", failures_path)])
    if problem:
        return _error(problem, EXIT_USAGE)
    if args.embeddings is not None and not args.embeddings.endswith((".npy", ".safetensors")):
        return _error(f"--embeddings {args.embeddings}: the name must end in .npy or .safetensors", EXIT_USAGE)

    def task(model, options):
        rows = audio._xvector_rows(model, args.audio, **options)
        good = [k for k, row in enumerate(rows) if row is not None]
        if len(good) < 2:  # (some input failed: all were given as at least two files)
            _error(f"fewer than two usable AUDIO files ({len(good)}); there is nothing to compare", EXIT_FAILURE)
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


# ============================================================================================ standalone
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unispeech-fast", description="Inference on audio files.")
    add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with only the file commands and run one (``python -m unispeech_fast.audio_cli``)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on usage errors
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
