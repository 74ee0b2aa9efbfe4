"""Benchmarks of the ``contrastive_loss`` op: our backends and transformers' formulation, forward / backward / both.

The cases and providers are declared in ``unispeech_fast.bench.suites.contrastive_loss`` (shared with
``unispeech-fast bench --op contrastive_loss``); ``conftest.py`` parametrizes this test over them.
"""

OP = "contrastive_loss"


def test_contrastive_loss(bench_item, run_bench):
    run_bench(bench_item)
