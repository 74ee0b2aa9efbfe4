"""pytest integration of the benchmark harness (``unispeech_fast.bench``).

``pytest benchmarks/`` times every case x provider x mode of each ``bench_<op>.py`` with
pytest-benchmark (``--benchmark-json=PATH`` saves the numbers; ``extra_info`` carries the FLOP and byte
counts). ``pytest benchmarks/ --benchmark-disable`` runs each once as a plain test on the ``--quick``
grid: the fast CI check that every provider still runs. A provider that cannot run a case (triton or
cuda on CPU, a missing extension or library) is skipped with its reasons, never dropped.

Grid: ``--bench-grid quick|full``; by default quick when benchmarking is disabled or no GPU exists,
full otherwise. ``--bench-dtype`` (repeatable) picks dtypes (default float16 on CUDA, float32 on CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    group = parser.getgroup("unispeech_fast bench")
    group.addoption("--bench-grid", choices=("quick", "full"), default=None,
                    help="shape grid (default: quick with --benchmark-disable or without a GPU, else full)")
    group.addoption("--bench-dtype", action="append", choices=("float16", "bfloat16", "float32"), default=None,
                    help="dtype to benchmark; repeat for several (default: float16 on CUDA, float32 on CPU)")


def pytest_collect_file(file_path, parent):
    # The benchmark files are named bench_<op>.py (one op, one name everywhere), not test_*.py. A file
    # named on the command line is already collected by pytest's python plugin.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _benchmark_disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", default=False)) or not config.pluginmanager.hasplugin("benchmark")


def _quick(config) -> bool:
    grid = config.getoption("bench_grid")
    if grid is not None:
        return grid == "quick"
    return _benchmark_disabled(config) or not torch.cuda.is_available()


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    from unispeech_fast.bench.suites import make_suite

    op = getattr(metafunc.module, "OP")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = metafunc.config.getoption("bench_dtype") or (["float16"] if device.type == "cuda" else ["float32"])
    suite = make_suite(op, device, dtypes, quick=_quick(metafunc.config))
    items, ids = [], []
    for case in suite.cases:
        for provider in suite.providers:
            for mode in suite.modes:
                items.append((suite, case, provider, mode))
                ids.append(f"{provider.name}-{case.dtype_name}-{mode}-" + "-".join(f"{k}{v}" for k, v in case.params.items()))
    metafunc.parametrize("bench_item", items, ids=ids)


@pytest.fixture
def run_bench(request):
    """Run one (suite, case, provider, mode) under pytest-benchmark (or once, when it is disabled)."""

    def run(item):
        from unispeech_fast.bench.harness import op_step
        from unispeech_fast.dispatch import BackendNotSupportedError

        suite, case, provider, mode = item
        if provider.modes is not None and mode not in provider.modes:
            pytest.skip(f"{provider.name} does not implement mode {mode!r}")
        reasons = provider.not_supported_reasons(case)
        if reasons:
            pytest.skip("; ".join(reasons))
        inputs = suite.make_inputs(case)
        try:
            built = provider.build(case, inputs)
            fn = (suite.step or op_step)(built, case, inputs, mode)
            fn()  # also the check that the provider runs: a BackendNotSupportedError here is a skip
        except BackendNotSupportedError as exc:
            pytest.skip(str(exc))

        def timed():
            out = fn()
            if case.device.type == "cuda":
                torch.cuda.synchronize(case.device)
            return out

        if not request.config.pluginmanager.hasplugin("benchmark"):
            timed()
            return
        benchmark = request.getfixturevalue("benchmark")
        benchmark.extra_info.update(
            op=suite.op, provider=provider.name, shape=case.shape, dtype=case.dtype_name, mode=mode,
            flops=suite.flops(case, mode), bytes=suite.bytes(case, mode),
        )
        benchmark.pedantic(timed, rounds=max(suite.reps, 1), warmup_rounds=suite.warmup, iterations=1)

    return run
