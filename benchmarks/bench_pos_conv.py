"""Benchmarks of the ``pos_conv`` op: our backends and the peers, forward / backward / both.

The cases and providers are declared in ``unispeech_fast.bench.suites.pos_conv`` (shared with
``unispeech-fast bench --op pos_conv``); ``conftest.py`` parametrizes this test over them.
"""

OP = "pos_conv"


def test_pos_conv(bench_item, run_bench):
    run_bench(bench_item)
