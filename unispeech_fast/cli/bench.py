"""``unispeech-fast bench``: run the benchmark suites, print a table, write JSON/CSV/PNG, compare runs.

Wired into the main CLI with :func:`add_parser` (adds the ``bench`` subcommand) and :func:`run`.
Exit codes: 0 success, 1 a regression against ``--compare`` (or nothing could be measured), 2 usage error
(checked before anything runs, e.g. ``--out`` without matplotlib for the plots: install
``unispeech_fast[bench]`` or pass ``--no-plots``; an existing ``results.json``, ``results.csv`` or plot
in ``--out`` without ``--overwrite``). ``results.json`` and ``results.csv`` are written
before the plots, so a plotting problem never loses the measurements.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Sequence

from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_command

__all__ = ["add_parser", "run", "main"]

_DTYPES = ("float16", "bfloat16", "float32")


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold must be a percentage such as 10, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--threshold must be a finite percentage >= 0, got {text!r}")
    return value


def _count(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < (1 if name == "--reps" else 0):
            raise argparse.ArgumentTypeError(f"{name} must be >= {1 if name == '--reps' else 0}, got {value}")
        return value

    return parse


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..bench.suites import OPS

    parser.add_argument("--op", action="append", choices=OPS + ("all",), default=None,
                        help="suite to run; repeat for several (default: all ops and the models)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, 1 warm-up and 2 timed runs: a smoke test, not a measurement")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write results.json, results.csv and one PNG per op and dtype into DIR")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", action="append", choices=_DTYPES, default=None,
                        help="dtype; repeat for several (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--provider", action="append", default=None, metavar="NAME",
                        help="run only these providers (e.g. eager, triton, sdpa-flash, torch.compile, ours-auto)")
    parser.add_argument("--warmup", type=_count("--warmup"), default=None, help="untimed runs before timing")
    parser.add_argument("--reps", type=_count("--reps"), default=None, help="timed runs (median, p20, p80)")
    parser.add_argument("--compare", default=None, metavar="OLD.json",
                        help="compare with a stored results.json and flag regressions (exit code 1)")
    parser.add_argument("--threshold", type=_percent, default=10.0, metavar="PCT",
                        help="a row regresses when its median is more than PCT%% slower (default: 10)")
    parser.add_argument("--cpu-memory", action="store_true",
                        help="on CPU, measure each row's peak memory (RSS high-water mark) in a fresh "
                             "subprocess; slow: one process start per row (default: memory n/a on CPU)")
    parser.add_argument("--no-plots", action="store_true", help="with --out, skip the PNG plots")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --out, replace results.json, results.csv and plots that already exist there "
                             "(default: refuse them before anything runs)")
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = add_command(
        subparsers, "bench", run,
        help="benchmark the ops and models against eager PyTorch, SDPA, cuDNN and torch.compile",
        description="Time every op (forward, backward, forward+backward) and the models (inference and a "
                    "CTC fine-tuning step) on every provider: our backends and the peers. Prints a table; "
                    "with --out writes JSON/CSV rows and PNG plots; with --compare flags regressions.",
    )
    return _configure(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import harness, report
    from ..bench.suites import OPS, make_suite

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available here", file=sys.stderr)
        return EXIT_USAGE
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtypes = args.dtype or (["float16"] if device.type == "cuda" else ["float32"])
    ops = list(OPS) if not args.op or "all" in args.op else list(dict.fromkeys(args.op))
    old = None
    if args.compare is not None:
        try:
            old = report.load_records(args.compare)
        except (OSError, ValueError) as exc:
            print(f"error: --compare: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.out is not None and not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print("error: --out writes PNG plots, which need matplotlib, and it is not installed: "
              'pip install "unispeech_fast[bench]" (or pass --no-plots to write only results.json and '
              "results.csv)", file=sys.stderr)
        return EXIT_USAGE
    if args.out is not None and not args.overwrite:  # before measuring: a refusal afterwards would lose the run
        planned = ["results.json", "results.csv"]
        if not args.no_plots:
            planned += [f"{op}_{dtype}.png" for op in ops for dtype in dtypes]  # report.plot's names
        existing = [os.path.join(args.out, name) for name in planned if os.path.lexists(os.path.join(args.out, name))]
        if existing:
            print(f"error: --out {args.out}: {', '.join(existing)} already exist(s); pass --overwrite to replace "
                  "them or choose another directory", file=sys.stderr)
            return EXIT_USAGE
    if args.out is not None:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            print(f"error: --out {args.out}: cannot create the directory: {exc}", file=sys.stderr)
            return EXIT_USAGE
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else None)
    reps = args.reps if args.reps is not None else (2 if args.quick else None)

    rows: list = []
    notes: list[str] = []
    for op in ops:
        suite = make_suite(op, device, dtypes, quick=args.quick)
        notes.extend(suite.notes)
        known = {p.name for p in suite.providers}
        chosen = None
        if args.provider:
            chosen = [p for p in args.provider if p in known]
            if not chosen:
                print(f"note: {op}: none of --provider {args.provider} exists here (providers: "
                      f"{', '.join(sorted(known))})", file=sys.stderr)
                continue
        print(f"running {op} ({len(suite.cases)} case(s) x {len(chosen or known)} provider(s))...",
              file=sys.stderr, flush=True)
        rows.extend(harness.run_suite(suite, warmup=warmup, reps=reps, providers=chosen,
                                      cpu_memory=args.cpu_memory))
    records = report.to_records(rows)
    print(report.format_table(records))
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    if args.out is not None:
        json_path, csv_path = os.path.join(args.out, "results.json"), os.path.join(args.out, "results.csv")
        report.write_json(records, json_path)  # the measurements are on disk before any plotting
        report.write_csv(records, csv_path)
        written = [json_path, csv_path]
        if not args.no_plots:
            written += report.plot(records, args.out)
        print("wrote " + ", ".join(written))
    status = EXIT_OK if any(r["status"] == "ok" for r in records) else EXIT_FAILURE
    if old is not None:
        threshold = args.threshold / 100
        entries = report.compare(old, records, threshold)
        print(report.format_comparison(entries, threshold))
        if any(e["regression"] for e in entries):
            status = EXIT_FAILURE
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m unispeech_fast.bench.cli ...`` (same options as ``bench``)."""
    parser = _configure(argparse.ArgumentParser(prog="unispeech-fast bench", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
