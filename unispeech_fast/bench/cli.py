"""The ``bench`` command's old home: see :mod:`unispeech_fast.cli.bench`. Kept so that
``python -m unispeech_fast.bench.cli`` and ``from unispeech_fast.bench import cli`` keep working."""

from ..cli.bench import add_parser, main, run

__all__ = ["add_parser", "run", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
