"""Benchmarks of the ``attention`` op: our backends and the peers, forward / backward / both.

The cases and providers are declared in ``unispeech_fast.bench.suites.attention`` (shared with
``unispeech-fast bench --op attention``); ``conftest.py`` parametrizes this test over them.
"""

OP = "attention"


def test_attention(bench_item, run_bench):
    run_bench(bench_item)
