"""The ``info`` report: which backend can run which op on a device, and why not
(``python -m unispeech_fast info``)."""

from __future__ import annotations

from typing import Sequence

import torch

from .registry import _REGISTRY, BACKENDS, GPU_ORDER_REASON, OPS
from .selection import auto_order, backend_reasons, default_order


def available_backends(device: str | torch.device | None = None) -> dict[str, dict[str, list[str]]]:
    """Per op and backend, the reasons it cannot run on ``device`` (an empty list means usable).

    ``device`` defaults to ``"cpu"``; pass ``"cuda"`` to ask about the GPU. Shape/dtype-specific
    limits are not included: those are checked per call.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    table: dict[str, dict[str, list[str]]] = {}
    for op in OPS:
        table[op] = {}
        for name in BACKENDS:
            reasons = list(backend_reasons(name, dev))
            if _REGISTRY[op].get(name) is None:
                reasons.append(f"no {name} implementation of {op!r} exists yet")
            table[op][name] = reasons
    return table


def implemented_backends() -> dict[str, list[str]]:
    """Per op, the backends that have a registered implementation (whether or not usable here)."""
    return {op: [name for name in BACKENDS if name in _REGISTRY[op]] for op in OPS}


def format_backend_table(devices: Sequence[str] = ("cpu",)) -> str:
    """A readable table of which backend can run which op, per device, with every reason."""
    lines = []
    width = max(len(op) for op in OPS)
    for dev in devices:
        table = available_backends(dev)
        lines.append(f"device {dev}:")
        lines.append(f"  {'op'.ljust(width)}  " + "  ".join(b.ljust(6) for b in BACKENDS) + "  auto picks")
        notes: dict[str, dict[str, None]] = {name: {} for name in BACKENDS}
        missing: dict[str, list[str]] = {name: [] for name in BACKENDS}
        measured_any = False
        for op in OPS:
            cells, pick = [], "-"
            order, measured = auto_order(op, dev, torch.float32)
            measured_any |= measured
            for name in order:
                if not table[op][name] and not (name == "triton" and torch.device(dev).type == "cpu"):
                    pick = name + (" (measured order)" if measured else "")  # auto never picks the interpreter
                    break
            for name in BACKENDS:
                reasons = table[op][name]
                cells.append(("yes" if not reasons else "no").ljust(6))
                for reason in reasons:
                    if reason.startswith(f"no {name} implementation"):
                        missing[name].append(op)
                    else:
                        notes[name][reason] = None
            lines.append(f"  {op.ljust(width)}  " + "  ".join(cells) + f"  {pick}")
        for name in BACKENDS:
            why = list(notes[name])
            if missing[name]:
                why.insert(0, "no kernel implemented yet for " + ", ".join(missing[name]))
            if why:
                lines.append(f"  {name}: " + "; ".join(why))
        lines.append("  auto picks for float32 inference: " + (
            "fastest first where benchmarks measured the op here (unispeech_fast/_auto_order.py), else "
            if measured_any else "no measured order for this device; ") + "the default order "
            + ", ".join(default_order(dev)))
    lines.append("  " + GPU_ORDER_REASON)
    return "\n".join(lines)


