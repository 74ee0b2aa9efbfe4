"""Benchmarks of the ``feature_extractor`` op: our backends and the peers, forward / backward / both.

The cases and providers are declared in ``unispeech_fast.bench.suites.feature_extractor`` (shared with
``unispeech-fast bench --op feature_extractor``); ``conftest.py`` parametrizes this test over them.
"""

OP = "feature_extractor"


def test_feature_extractor(bench_item, run_bench):
    run_bench(bench_item)
