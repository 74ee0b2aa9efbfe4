"""The benchmark harness: suites of cases x providers x modes, timed, measured and turned into rows.

A :class:`Suite` declares one op (or the models): its :class:`Case` list (shape parameters, dtype,
device), its :class:`Provider` list, the modes it measures, how to make inputs and the FLOP/byte formulas.
:func:`run_suite` runs every (case, provider, mode) and returns one :class:`Row` each -- a provider that
cannot run a case gives a ``"skipped"`` row with the reasons, one that fails gives an ``"error"`` row
with the exception; nothing is dropped.

Timing: on CUDA each repetition is bracketed by ``torch.cuda.Event`` s and the device is synchronised
before reading them; on CPU ``time.perf_counter``. ``warmup`` untimed runs first, then ``reps`` timed
runs; rows carry the median, p20, p80 and min.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated()`` during one extra run minus the memory
allocated before it (inputs, weights and, for ``"bwd"``, the saved forward graph are in the baseline,
so the number is what the measured step adds). On CPU it is ``None`` ("n/a") by default:
``tracemalloc`` does not see torch's allocator and a long-lived process keeps freed memory resident.
``cpu_memory=True`` (``--cpu-memory``) measures each row's step in a fresh subprocess instead
(:mod:`.memory`: resident-set high-water mark over the RSS before the step), at the cost of one
process start per row.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import torch

from .flops import device_peak

__all__ = [
    "Case",
    "Provider",
    "Suite",
    "Row",
    "Timing",
    "time_fn",
    "peak_memory_bytes",
    "op_step",
    "run_suite",
    "device_name",
    "quantile",
]


@dataclasses.dataclass
class Case:
    """One input configuration. ``params`` are the shape parameters (``x_key`` is the one plotted)."""

    op: str
    params: dict[str, Any]
    dtype: torch.dtype
    device: torch.device
    x_key: str

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclasses.dataclass
class Provider:
    """One way to run a suite's op.

    ``build(case, inputs)`` returns what the suite's ``step`` needs (for ops: ``(forward_fn, leaves)``,
    the differentiable tensors the backward computes gradients for). ``not_supported_reasons(case)``
    returns plain-English reasons it cannot run (empty when it can). ``modes`` limits the modes it is
    measured in (None: all of the suite's).
    """

    name: str
    build: Callable[[Case, dict[str, Any]], Any]
    not_supported_reasons: Callable[[Case], list[str]] = lambda case: []
    modes: tuple[str, ...] | None = None
    kind: str = "ours"  # "ours" or "peer"


@dataclasses.dataclass
class Suite:
    """An op's benchmark: cases, providers, modes, inputs and formulas.

    ``make_inputs(case)`` returns the named inputs (fresh tensors, differentiable ones with
    ``requires_grad``). ``step(built, case, inputs, mode)`` turns a provider's built object into the
    zero-argument callable that is timed (default :func:`op_step`). ``flops`` / ``bytes`` give the
    work of one step (None where not meaningful).
    """

    op: str
    cases: list[Case]
    providers: list[Provider]
    make_inputs: Callable[[Case], dict[str, Any]]
    modes: tuple[str, ...] = ("fwd", "bwd", "fwd_bwd")
    flops: Callable[[Case, str], float | None] = lambda case, mode: None
    bytes: Callable[[Case, str], float | None] = lambda case, mode: None
    step: Callable[[Any, Case, dict[str, Any], str], Callable[[], Any]] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    warmup: int = 3
    reps: int = 10
    #: how to rebuild this suite in another process (``make_suite`` keyword arguments); None for ad-hoc suites
    origin: dict[str, Any] | None = None


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int


@dataclasses.dataclass
class Row:
    """One measured (or skipped) case x provider x mode; serialised as a JSON/CSV row by ``report``."""

    op: str
    provider: str
    kind: str
    shape: str
    params: dict[str, Any]
    x_key: str
    dtype: str
    mode: str
    device: str
    device_name: str
    status: str  # "ok", "skipped" or "error"
    reason: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    min_ms: float | None = None
    reps: int = 0
    peak_mem_mb: float | None = None
    mem_method: str = ""  # "cuda max_memory_allocated", "rss subprocess" or "" (not measured)
    flops: float | None = None
    bytes: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    pct_peak_flops: float | None = None
    pct_peak_bw: float | None = None

    @property
    def key(self) -> tuple:
        return (self.op, self.provider, self.shape, self.dtype, self.mode)


# ---------------------------------------------------------------------------------------------- timing
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> Timing:
    """Median / p20 / p80 / min in milliseconds of ``reps`` timed calls after ``warmup`` untimed ones."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(max(warmup, 0)):
        fn()
    _sync(device)
    times: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), quantile(times, 0.2), quantile(times, 0.8), min(times), reps)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak CUDA memory one call of ``fn`` adds over what is allocated before it; None on CPU (n/a)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    # The vector ISA torch's CPU kernels use (AVX512, AVX2, ...): the measured auto order is keyed by it.
    return (f"cpu ({platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads)")


# ---------------------------------------------------------------------------------------------- op steps
def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor) and item.requires_grad:
                return item
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"a benchmarked forward must return a tensor or a tuple of tensors, got {type(out).__name__}")


def op_step(built: tuple[Callable[[], Any], list[torch.Tensor]], case: Case, inputs: dict[str, Any],
            mode: str) -> Callable[[], Any]:
    """The timed callable of an op in ``mode``.

    ``"fwd"``: the forward under ``torch.no_grad``. ``"bwd"``: ``torch.autograd.grad`` of the (first)
    output against ``leaves`` with a fixed random cotangent, the forward graph built once and retained.
    ``"fwd_bwd"``: forward then that gradient, both timed.
    """
    forward, leaves = built
    if mode == "fwd":
        def run_fwd():
            with torch.no_grad():
                return forward()
        return run_fwd
    if not leaves:
        raise ValueError(f"{case.op}: mode {mode!r} needs inputs that require grad; this provider has none")
    out = _first_tensor(forward())
    if not out.requires_grad:
        raise RuntimeError(f"{case.op}: the forward output does not require grad, so {mode!r} cannot be measured")
    cotangent = torch.randn_like(out)
    if mode == "bwd":
        def run_bwd():
            return torch.autograd.grad(out, leaves, cotangent, retain_graph=True, allow_unused=True)
        return run_bwd
    if mode == "fwd_bwd":
        del out

        def run_fwd_bwd():
            o = _first_tensor(forward())
            return torch.autograd.grad(o, leaves, cotangent, allow_unused=True)
        return run_fwd_bwd
    raise ValueError(f"unknown mode {mode!r}; expected 'fwd', 'bwd' or 'fwd_bwd'")


# ---------------------------------------------------------------------------------------------- running
def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    rest = [line.strip() for line in text.splitlines()[1:] if line.strip().startswith("- ")]
    return f"{type(exc).__name__}: {first}" + (" " + " ".join(rest) if rest else "")


def _is_not_supported(exc: BaseException) -> bool:
    from ..dispatch import BackendNotSupportedError

    return isinstance(exc, BackendNotSupportedError)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe_in_subprocess(spec: dict[str, Any], timeout: float = 900.0) -> tuple[int | None, str]:
    """``(peak bytes, "")`` of the step ``spec`` names, measured by :mod:`.memory` in a fresh interpreter,
    or ``(None, why not)``."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "unispeech_fast.bench.memory", json.dumps(spec)],
            # not the repository root: a top-level kernels/ folder there would shadow a PyPI package
            cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, f"memory probe timed out after {timeout:g} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory probe failed: {tail}"
    result = json.loads(lines[-1])
    return result.get("peak_bytes"), result.get("error", "")


def _cpu_peak(suite: Suite, case: Case, provider: Provider, mode: str) -> tuple[int | None, str, str]:
    if suite.origin is None:
        return None, "memory: this suite cannot be rebuilt in a subprocess (no origin)", ""
    spec = dict(suite.origin, dtype=case.dtype_name, shape=case.shape, provider=provider.name, mode=mode)
    peak, why = probe_in_subprocess(spec)
    return peak, ("" if peak is not None else f"memory: {why}"), ("rss subprocess" if peak is not None else "")


def run_suite(
    suite: Suite,
    *,
    warmup: int | None = None,
    reps: int | None = None,
    measure_memory: bool = True,
    cpu_memory: bool = False,
    providers: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Row]:
    """Run every case x provider x mode of ``suite``; returns the rows (ok, skipped or error).

    ``providers`` limits the run to those names; ``cpu_memory`` measures CPU peak memory per row in a
    fresh subprocess (needs ``suite.origin``); ``log`` is called with a line before each measurement.
    """
    warmup = suite.warmup if warmup is None else warmup
    reps = suite.reps if reps is None else reps
    step = suite.step or op_step
    rows: list[Row] = []
    chosen = [p for p in suite.providers if providers is None or p.name in providers]
    for case in suite.cases:
        dev_name = device_name(case.device)
        peak_flops, peak_bw = device_peak(dev_name, case.dtype_name)

        def row(provider: Provider, mode: str, status: str, reason: str = "", **fields) -> Row:
            return Row(op=suite.op, provider=provider.name, kind=provider.kind, shape=case.shape,
                       params=dict(case.params), x_key=case.x_key, dtype=case.dtype_name, mode=mode,
                       device=case.device.type, device_name=dev_name, status=status, reason=reason, **fields)

        for provider in chosen:
            modes = [m for m in suite.modes if provider.modes is None or m in provider.modes]
            missing = [m for m in suite.modes if m not in modes]
            for mode in missing:
                rows.append(row(provider, mode, "skipped", f"{provider.name} does not implement mode {mode!r}"))
            reasons = list(provider.not_supported_reasons(case))
            if reasons:
                rows.extend(row(provider, m, "skipped", "; ".join(reasons)) for m in modes)
                continue
            failure = None
            try:
                inputs = suite.make_inputs(case)
                built = provider.build(case, inputs)
            except Exception as exc:  # noqa: BLE001 -- reported in the row, never dropped
                failure = ("skipped" if _is_not_supported(exc) else "error", _short(exc))
            if failure is not None:  # freed outside the except block, which holds the traceback's frames
                rows.extend(row(provider, m, *failure) for m in modes)
                _free(case.device)
                continue
            for mode in modes:
                if log is not None:
                    log(f"{suite.op} {case.shape} {case.dtype_name} {provider.name} {mode}")
                fn = None
                try:
                    fn = step(built, case, inputs, mode)
                    timing = time_fn(fn, case.device, warmup, reps)
                    peak = peak_memory_bytes(fn, case.device) if measure_memory else None
                    method = "cuda max_memory_allocated" if peak is not None else ""
                except Exception as exc:  # noqa: BLE001 -- reported in the row, never dropped
                    failure = ("skipped" if _is_not_supported(exc) else "error", _short(exc))
                if failure is not None:
                    rows.append(row(provider, mode, *failure))
                    failure = fn = None
                    _free(case.device)
                    continue
                note = ""
                if case.device.type == "cpu" and cpu_memory and measure_memory:
                    peak, note, method = _cpu_peak(suite, case, provider, mode)
                flops, nbytes = suite.flops(case, mode), suite.bytes(case, mode)
                seconds = timing.median_ms / 1e3
                tflops = flops / seconds / 1e12 if flops else None
                gbps = nbytes / seconds / 1e9 if nbytes else None
                rows.append(row(
                    provider, mode, "ok", note, mem_method=method,
                    median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                    min_ms=timing.min_ms, reps=timing.reps,
                    peak_mem_mb=None if peak is None else peak / 2**20,
                    flops=flops, bytes=nbytes, tflops=tflops, gbps=gbps,
                    pct_peak_flops=100 * tflops / peak_flops if (tflops and peak_flops) else None,
                    pct_peak_bw=100 * gbps / (peak_bw * 1e3) if (gbps and peak_bw) else None,
                ))
                del fn
            del built, inputs
            _free(case.device)
    return rows
