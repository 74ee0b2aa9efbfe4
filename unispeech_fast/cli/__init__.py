"""Command line: ``python -m unispeech_fast COMMAND`` (also installed as ``unispeech-fast``).

One module per group of commands, all built on :mod:`.common` (exit codes, the sample rate,
argument validators, ``error:`` lines):

- :mod:`.info`: ``info`` (versions, devices, the extension, which backend can run which op);
- :mod:`.demo`: ``demo`` (a randomly initialised UniSpeechSatModel on random audio, timed);
- :mod:`.audio`: ``embed``, ``transcribe``, ``diarize``, ``verify-speakers`` and corpus jobs;
- :mod:`.bench`: ``bench`` (the benchmark suites);
- :mod:`.finetune`: ``finetune`` and ``pretrain`` (torchrun/DDP training from a manifest; defined in :mod:`unispeech_fast.train.cli`).

Exit codes: 0 success, 1 runtime failure (for example a forced backend that cannot run), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import audio, bench, demo, finetune, info
from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, SAMPLE_RATE, run_command  # noqa: F401 (EXIT_*, SAMPLE_RATE re-exported)
from .demo import cmd_demo, tiny_config  # noqa: F401 (re-exported)
from .info import cmd_info  # noqa: F401 (re-exported)

__all__ = ["main", "build_parser", "tiny_config"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="unispeech-fast",
        description="UniSpeech / UniSpeech-SAT with custom kernels behind a checked dispatch layer.",
        epilog="Run `%(prog)s COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"unispeech_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info.add_parser(sub)
    demo.add_parser(sub)
    audio.add_parsers(sub)  # embed, transcribe, diarize, verify-speakers (files in, results out)
    bench.add_parser(sub)  # kernel and model benchmarks
    finetune.add_parsers(sub)  # finetune, pretrain (torchrun/DDP training from a manifest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = run_command(build_parser(), argv)
    except BrokenPipeError:  # output piped into `head` and the like
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker (finetune, pretrain, corpus jobs) whose command has returned: every output is
        # written and closed and the process group destroyed. Leave without interpreter finalisation, where
        # gloo's worker threads were seen to abort a finished run (SIGABRT, "terminate called without an
        # active exception"; tests/test_train_cli.py, about one run in several on 2 CPU cores). Once a DDP
        # wrapper was built, destroy_process_group() leaves the gloo backend and its threads alive (torch
        # 2.13; README "Training" says what was established), so they run on into finalisation.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
