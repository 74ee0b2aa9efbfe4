"""End-to-end benchmarks: UniSpeech / UniSpeech-SAT ForCTC (base and large), inference and a CTC
fine-tuning step (feature encoder frozen), ours per backend vs transformers eager, sdpa and
torch.compile, on the batch x duration grid 1 x 2 s, 8 x 15 s, 32 x 5 s, 1 x 10 min (GPU; trimmed on CPU).

The grid and providers are declared in ``unispeech_fast.bench.suites.models`` (shared with
``unispeech-fast bench --op models``); ``conftest.py`` parametrizes this test over them.
"""

OP = "models"


def test_models(bench_item, run_bench):
    run_bench(bench_item)
