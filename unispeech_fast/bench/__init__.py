"""Benchmark harness for the fused ops and the models (``unispeech-fast bench``, ``pytest benchmarks/``).

* :mod:`.harness`: cases, providers, suites; timing (CUDA events / ``perf_counter``), peak memory, rows.
* :mod:`.flops`: explicit FLOP and byte formulas, and the table of device peaks.
* :mod:`.providers`: our backends (through ``unispeech_fast.backend``) and the peers (SDPA per backend,
  transformers' modules, ``torch.compile`` of the eager reference).
* :mod:`.suites`: the shape grids and inputs of each op and of the models.
* :mod:`.report`: table, JSON/CSV, PNG plots, comparison with a stored run.
* the ``bench`` subcommand is :mod:`unispeech_fast.cli.bench` (:mod:`.cli` re-exports it).

Importing this package imports torch but not triton, transformers or matplotlib.
"""

from __future__ import annotations

from .harness import Case, Provider, Row, Suite, run_suite

__all__ = ["Case", "Provider", "Row", "Suite", "run_suite"]
