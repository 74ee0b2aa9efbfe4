"""Derive ``backend("auto")``'s per-op order from measured benchmark rows.

``unispeech-fast bench --out DIR`` writes ``DIR/results.json``; this module reads such files and, per
(device key, op, dtype, mode), orders our backends by measured time, fastest first, and writes the
table that :mod:`unispeech_fast.dispatch` consults (``unispeech_fast/_auto_order.py``)::

    python -m unispeech_fast.bench.auto_order --write benchmarks/results/cpu_ops_2026-11-29/results.json

(``--write`` replaces ``unispeech_fast/_auto_order.py`` once the new text is complete: redirecting
stdout onto it would empty the module that importing the package reads. Without ``--write`` the text
goes to stdout.)

Only rows of our own backends (``kind == "ours"``) with ``status == "ok"`` count. Modes are ``fwd``
(used for calls without autograd) and ``fwd_bwd`` (used when an input requires grad). CPU rows are
keyed by the vector ISA in their device name (``cpu:AVX512``, ``cpu:AVX2``, ...; see
:func:`unispeech_fast.dispatch.device_key`). Within a group
the backends are compared on the shapes that every one of them ran, by the geometric mean of their
median times; a group where fewer than two backends ran gives no order, and dispatch keeps its default
order there (:data:`unispeech_fast.dispatch.BACKENDS`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Iterable, Sequence

from .. import dispatch

__all__ = ["derive", "render", "main"]

MODES = ("fwd", "fwd_bwd")
Key = tuple[str, str, str, str]  # (device key, op, dtype, mode)


_ISA = re.compile(r"\b(AVX512|AVX2|DEFAULT|VSX|ZVECTOR|SVE\d*|NEON)\b")


def _device_key(row: dict) -> str | None:
    """``"cpu:<ISA>"`` for CPU rows (the ISA read off ``device_name``; rows without one are not used,
    since an order measured on one CPU kind must not steer another), else the device type."""
    kind = str(row.get("device", "")).split(":")[0]
    if kind != "cpu":
        return kind or None
    match = _ISA.search(str(row.get("device_name", "")))
    return f"cpu:{match.group(1)}" if match else None


def derive(rows: Iterable[dict]) -> dict[Key, tuple[str, ...]]:
    """``{(device key, op, dtype, mode): backends fastest first}`` from benchmark result rows."""
    times: dict[Key, dict[str, dict[str, float]]] = {}
    for row in rows:
        if row.get("kind") != "ours" or row.get("status") != "ok" or row.get("mode") not in MODES:
            continue
        if row.get("provider") not in dispatch.BACKENDS or row.get("op") not in dispatch.OPS:
            continue
        median = row.get("median_ms")
        if not isinstance(median, (int, float)) or not median > 0:
            continue
        device = _device_key(row)
        if device is None:
            continue
        key = (device, row["op"], row["dtype"], row["mode"])
        times.setdefault(key, {}).setdefault(row["provider"], {})[row["shape"]] = float(median)
    orders: dict[Key, tuple[str, ...]] = {}
    for key, per_backend in sorted(times.items()):
        if len(per_backend) < 2:
            continue
        shared = set.intersection(*(set(shapes) for shapes in per_backend.values()))
        if not shared:
            continue
        score = {b: sum(math.log(per_backend[b][s]) for s in shared) / len(shared) for b in per_backend}
        # Ties (to the microsecond in the geometric mean) keep the default order.
        orders[key] = tuple(sorted(per_backend, key=lambda b: (round(score[b], 6), dispatch.BACKENDS.index(b))))
    return orders


def render(orders: dict[Key, tuple[str, ...]], sources: Sequence[str]) -> str:
    """The source text of ``unispeech_fast/_auto_order.py`` for ``orders`` measured in ``sources``."""
    lines = [
        '"""The measured order of ``backend("auto")``: generated, do not edit.',
        "",
        "Made by ``python -m unispeech_fast.bench.auto_order`` (see :mod:`unispeech_fast.bench.auto_order`)",
        "from the benchmark results in ``SOURCES``. Keys are (device key, op, dtype, mode), the device key",
        "being ``cpu:<ISA>`` or the device type; values are our backends, fastest first. Where a key is",
        "absent, dispatch uses its default order.",
        '"""',
        "",
        "SOURCES: tuple[str, ...] = (",
        *(f"    {s!r}," for s in sources),
        ")",
        "",
        "ORDERS: dict[tuple[str, str, str, str], tuple[str, ...]] = {",
        *(f"    {key!r}: {value!r}," for key, value in sorted(orders.items())),
        "}",
        "",
    ]
    return "\n".join(lines)


TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_auto_order.py")


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    write = "--write" in paths
    paths = [p for p in paths if p != "--write"]
    if not paths or any(p.startswith("-") for p in paths):
        print("usage: python -m unispeech_fast.bench.auto_order [--write] RESULTS.json [...]", file=sys.stderr)
        return 2
    rows: list[dict] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: cannot read benchmark results {path}: {exc}", file=sys.stderr)
            return 1
        file_rows = doc.get("rows", []) if isinstance(doc, dict) else doc
        if not isinstance(file_rows, list):
            print(f"error: {path}: expected a list of rows", file=sys.stderr)
            return 1
        rows.extend(file_rows)
    text = render(derive(rows), [os.path.normpath(p) for p in paths])
    if not write:
        sys.stdout.write(text)
        return 0
    tmp = TABLE_PATH + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, TABLE_PATH)
    print(f"wrote {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
