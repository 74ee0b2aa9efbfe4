"""Benchmarks of the ``gumbel_quantizer`` op: our backends and the peers, forward / backward / both.

The cases and providers are declared in ``unispeech_fast.bench.suites.gumbel_quantizer`` (shared with
``unispeech-fast bench --op gumbel_quantizer``); ``conftest.py`` parametrizes this test over them.
"""

OP = "gumbel_quantizer"


def test_gumbel_quantizer(bench_item, run_bench):
    run_bench(bench_item)
