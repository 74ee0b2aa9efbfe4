"""Benchmarks of the ``linear`` op: our backends and the peers, forward / backward / both.

The cases and providers are declared in ``unispeech_fast.bench.suites.linear`` (shared with
``unispeech-fast bench --op linear``); ``conftest.py`` parametrizes this test over them.
"""

OP = "linear"


def test_linear(bench_item, run_bench):
    run_bench(bench_item)
