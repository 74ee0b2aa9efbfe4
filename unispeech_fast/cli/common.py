"""What every command of the CLI shares: exit codes, the sample rate, argument validators, error lines.

Exit codes: :data:`EXIT_OK` (0) success, :data:`EXIT_FAILURE` (1) runtime failure, :data:`EXIT_USAGE`
(2) usage error (argparse exits with 2 on its own errors too), :data:`EXIT_INTERRUPTED` (130) stopped by SIGINT
(the training commands). Errors are ``error:`` lines on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..audio.resampling import SAMPLE_RATE

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "SAMPLE_RATE", "positive", "non_negative",
           "fraction", "error", "run_command",
           "add_command", "backend_from_environment"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C


def _number(kind: type, text: str, name: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}") from None


def _finite(kind: type, name: str, accept, requirement: str):
    """An argparse ``type`` that parses ``kind`` (int or float) and requires ``accept(value)`` and a finite value.
    NaN fails every comparison, so it is refused too (it would otherwise silently switch a feature off)."""
    def parse(text: str):
        value = _number(kind, text, name, f"a {kind.__name__}")
        if not accept(value) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be {requirement}, got {text!r}")
        return value

    return parse


def positive(kind: type, name: str):
    """An argparse ``type`` that parses ``kind`` (int or float) and requires it positive and finite."""
    return _finite(kind, name, lambda v: v > 0, "positive and finite")


def non_negative(kind: type, name: str):
    """An argparse ``type`` that parses ``kind`` (int or float) and requires it finite and >= 0 (0 is often "off")."""
    return _finite(kind, name, lambda v: v >= 0, "finite and >= 0")


def fraction(name: str, high_open: bool):
    """An argparse ``type`` for a number in ``[0, 1)`` (``high_open``) or ``[0, 1]``."""
    def parse(text: str):
        value = _number(float, text, name, "a number")
        if not (0.0 <= value < 1.0 if high_open else 0.0 <= value <= 1.0):
            raise argparse.ArgumentTypeError(f"{name} must be in [0, {'1)' if high_open else '1]'}, got {text!r}")
        return value

    return parse


def error(message: str, code: int) -> int:
    """Print ``error: message`` on stderr and return ``code`` (the command's exit code)."""
    print(f"error: {message}", file=sys.stderr)
    return code


def backend_from_environment(args: argparse.Namespace) -> str | None:
    """Check ``$UNISPEECH_FAST_VERIFY`` and, when ``--backend`` was not given, set ``args.backend`` from
    ``$UNISPEECH_FAST_BACKEND``. Returns the problem with either variable (for a usage error), or None."""
    from ..dispatch import current_backend, verify_enabled

    try:
        verify_enabled()
        if args.backend is None:
            args.backend = current_backend()
    except ValueError as exc:  # a bad $UNISPEECH_FAST_VERIFY or $UNISPEECH_FAST_BACKEND
        return str(exc)
    return None


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` (argparse exits with status 2 on usage errors) and run the chosen command's
    ``func``; no command prints the help and returns :data:`EXIT_USAGE`."""
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args)


def add_command(subparsers, name: str, func, *, help: str, description: str) -> argparse.ArgumentParser:
    """``subparsers.add_parser(name, ...)`` set to run ``func(args) -> exit code``."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=func)
    return parser
