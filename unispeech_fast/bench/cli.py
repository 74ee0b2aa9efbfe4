"""The ``bench`` command's old home: see :mod:`unispeech_fast.cli.bench`. Kept because it is a public path:
``python -m unispeech_fast.bench.cli`` is a documented command (``benchmarks/README.md``) and
``from unispeech_fast.bench import cli`` is used by callers (tests/test_bench.py, tests/test_reliability_cli.py)."""

from ..cli.bench import add_parser, main, run

__all__ = ["add_parser", "run", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
