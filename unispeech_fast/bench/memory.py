"""Peak host memory of one benchmark step on CPU, measured in a fresh subprocess (opt-in: ``--cpu-memory``).

torch's CPU allocator is invisible to ``tracemalloc``, and in a long-lived process freed memory stays
resident, so the step runs in a new Python process instead, with glibc's ``MALLOC_MMAP_THRESHOLD_``
fixed at 64 KiB (so every tensor of 64 KiB or more is its own mapping, returned to the system when
freed, instead of heap memory that stays resident). The probe builds the suite's inputs and the
provider, prepares the step, runs it once as a warm-up (one-time library and cache allocations are
not the step's), resets the kernel's resident-set high-water mark (``VmHWM``, by writing ``5`` to
``/proc/self/clear_refs``), runs the step again and reports ``VmHWM`` minus ``VmRSS`` measured just
before it: the memory the step adds at its peak. Linux only; elsewhere the probe says why not.

    python -m unispeech_fast.bench.memory '{"op": ..., "dtype": ..., "quick": ..., "shape": ..., "provider": ..., "mode": ...}'
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any

import torch

from .harness import op_step
from .suites import make_suite

__all__ = ["probe", "main"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def probe(spec: dict[str, Any]) -> int:
    """Run one step as described by ``spec`` in this process; returns the peak bytes it added."""
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("peak RSS needs Linux's /proc/self/clear_refs (not available here)")
    torch.manual_seed(0)
    suite = make_suite(spec["op"], "cpu", [spec["dtype"]], quick=spec["quick"])
    matches = [c for c in suite.cases if c.shape == spec["shape"]]
    providers = [p for p in suite.providers if p.name == spec["provider"]]
    if not matches or not providers:
        raise RuntimeError(f"no case {spec['shape']!r} / provider {spec['provider']!r} in the {spec['op']} suite")
    case, provider = matches[0], providers[0]
    inputs = suite.make_inputs(case)
    built = provider.build(case, inputs)
    fn = (suite.step or op_step)(built, case, inputs, spec["mode"])
    fn()  # warm-up
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        peak = probe(json.loads(argv[0]))
    except Exception as exc:  # noqa: BLE001 -- reported to the parent as the reason
        print(json.dumps({"peak_bytes": None, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}))
        return 0
    print(json.dumps({"peak_bytes": peak}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
