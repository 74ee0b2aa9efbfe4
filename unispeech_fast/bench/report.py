"""Rows out: a readable table, JSON and CSV files, PNG plots, and comparison with a stored run.

Every JSON/CSV row is self-describing: op, provider, shape (and its parameters), dtype, mode, status
(ok / skipped / error) with the reason, median / p20 / p80 / min in ms, peak memory (MB, empty where
not measured: CPU), FLOPs, bytes, TFLOP/s, GB/s, % of the device's peak, device name, the versions of
torch / triton / transformers / unispeech_fast / CUDA, the git commit and the ISO date of the run.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import subprocess
from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch

from .harness import Row

__all__ = [
    "FIELDS",
    "run_metadata",
    "to_records",
    "format_table",
    "write_json",
    "write_csv",
    "load_records",
    "compare",
    "format_comparison",
    "plot",
]

_META_FIELDS = ("torch", "triton", "transformers", "unispeech_fast", "cuda", "git_commit", "date")
FIELDS = tuple(f.name for f in dataclasses.fields(Row)) + _META_FIELDS


def _version(dist: str, module: str | None = None) -> str:
    if importlib.util.find_spec(module or dist) is None:
        return "not installed"
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str:
    """``git rev-parse HEAD`` of the checkout holding this package (``+dirty`` with local changes), or
    ``"unknown"`` outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "") if commit else "unknown"


def run_metadata() -> dict[str, str]:
    """Versions, git commit and the ISO date (UTC) stamped on every row of a run."""
    from .. import __version__

    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "unispeech_fast": __version__,
        "cuda": torch.version.cuda or "none",
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def to_records(rows: Iterable[Row], meta: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows as plain dicts carrying the run metadata."""
    meta = run_metadata() if meta is None else meta
    return [{**dataclasses.asdict(r), **meta} for r in rows]


# ---------------------------------------------------------------------------------------------- files
def write_json(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(list(records), f, indent=1, sort_keys=False)
        f.write("\n")


def write_csv(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else
                                 ("" if v is None else v)) for k, v in rec.items()})


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows from a JSON file written by :func:`write_json` (a list of rows, or ``{"rows": [...]}``)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and "rows" in data:
        data = data["rows"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{os.fspath(path)}: expected a JSON list of benchmark rows written by "
                         "`unispeech-fast bench`")
    required = {"op", "provider", "shape", "dtype", "mode", "status", "median_ms"}
    for i, rec in enumerate(data):
        missing = required - set(rec)
        if missing:
            raise ValueError(f"{os.fspath(path)}: row {i} lacks {sorted(missing)}; not a benchmark row")
    return data


# ---------------------------------------------------------------------------------------------- table
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Measured rows per op as a table, then every skipped or failed provider with its reason."""
    lines: list[str] = []
    by_op: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        by_op[rec["op"]].append(rec)
    for op, recs in by_op.items():
        ok = [r for r in recs if r["status"] == "ok"]
        lines.append(f"== {op} on {recs[0]['device_name']}")
        if ok:
            shape_w = max(len("shape"), *(len(r["shape"]) for r in ok))
            prov_w = max(len("provider"), *(len(r["provider"]) for r in ok))
            head = (f"  {'provider':<{prov_w}}  {'shape':<{shape_w}}  {'dtype':<8} {'mode':<9} {'median ms':>10} "
                    f"{'p20-p80 ms':>19} {'mem MB':>8} {'TFLOP/s':>8} {'%peak':>6} {'GB/s':>8} {'%bw':>5}")
            lines.append(head)
            for r in ok:
                spread = f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}"
                pct = r["pct_peak_flops"]
                lines.append(
                    f"  {r['provider']:<{prov_w}}  {r['shape']:<{shape_w}}  {r['dtype']:<8} {r['mode']:<9} "
                    f"{_fmt(r['median_ms'], '.3f'):>10} {spread:>19} {_fmt(r['peak_mem_mb'], '.1f'):>8} "
                    f"{_fmt(r['tflops'], '.3g'):>8} {_fmt(pct, '.1f'):>6} {_fmt(r['gbps'], '.3g'):>8} "
                    f"{_fmt(r['pct_peak_bw'], '.1f'):>5}"
                )
        else:
            lines.append("  (no provider ran)")
        notes: dict[tuple[str, str, str], list[str]] = defaultdict(list)
        for r in recs:
            if r["status"] != "ok" or r["reason"]:
                notes[(r["provider"], "note" if r["status"] == "ok" else r["status"], r["reason"])].append(f"{r['shape']} {r['dtype']} {r['mode']}")
        for (provider, status, reason), where in notes.items():
            lines.append(f"  {status} {provider} ({len(where)} row{'s' if len(where) != 1 else ''}): {reason}")
    if any(r["status"] == "ok" and r["peak_mem_mb"] is None for r in records):
        lines.append("memory: '-' = not measured (CPU: torch's allocator is invisible to tracemalloc and a "
                     "long-lived process keeps freed memory resident; --cpu-memory measures each row in a "
                     "fresh subprocess)")
    if any(r["status"] == "ok" and r["tflops"] is not None and r["pct_peak_flops"] is None for r in records):
        lines.append("%peak: '-' = the device's peak is unknown (only H100, H200 and A100 are tabulated)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- compare
def _key(rec: dict[str, Any]) -> tuple:
    return (rec["op"], rec["provider"], rec["shape"], rec["dtype"], rec["mode"])


def compare(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]], threshold: float = 0.10
            ) -> list[dict[str, Any]]:
    """Match rows by (op, provider, shape, dtype, mode); one entry per row measured in ``old``.

    Each entry has ``old_ms``, ``new_ms``, ``ratio`` (new / old median) and ``regression``: True when the
    new median is more than ``threshold`` (a fraction: 0.10 = 10%) slower, or when a row that ran
    before no longer runs (``new_ms`` None, with the new status and reason).
    """
    if not threshold >= 0:
        raise ValueError(f"threshold must be a fraction >= 0, got {threshold}")
    latest = {_key(r): r for r in new}
    out = []
    for rec in old:
        if rec["status"] != "ok" or rec["median_ms"] is None:
            continue
        now = latest.get(_key(rec))
        entry = {"op": rec["op"], "provider": rec["provider"], "shape": rec["shape"], "dtype": rec["dtype"],
                 "mode": rec["mode"], "old_ms": rec["median_ms"], "new_ms": None, "ratio": None,
                 "regression": False, "note": "",
                 "device_changed": now is not None and now.get("device_name") != rec.get("device_name")}
        if now is None:
            entry["note"] = "not in the new run"
        elif now["status"] != "ok":
            entry.update(regression=True, note=f"now {now['status']}: {now['reason']}")
        else:
            ratio = now["median_ms"] / rec["median_ms"]
            entry.update(new_ms=now["median_ms"], ratio=ratio, regression=ratio > 1 + threshold)
        out.append(entry)
    return out


def format_comparison(entries: Sequence[dict[str, Any]], threshold: float) -> str:
    flagged = [e for e in entries if e["regression"]]
    matched = [e for e in entries if e["ratio"] is not None]
    lines = [f"compared {len(matched)} rows with the stored run; {len(flagged)} regression(s) "
             f"(> {threshold * 100:g}% slower, or no longer running)"]
    for e in flagged:
        what = (f"{e['old_ms']:.3f} -> {e['new_ms']:.3f} ms (x{e['ratio']:.2f})" if e["ratio"] is not None
                else f"{e['old_ms']:.3f} ms -> {e['note']}")
        lines.append(f"  REGRESSION {e['op']} {e['provider']} {e['shape']} {e['dtype']} {e['mode']}: {what}")
    if any(e["device_changed"] for e in entries):
        lines.append("  note: the stored run was on a different device; ratios compare different hardware")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def _series(recs: Sequence[dict[str, Any]], value: str) -> dict[str, list[tuple[float, float]]]:
    """provider (+ the parameters other than x) -> sorted (x, value) points."""
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in recs:
        v = r.get(value)
        if r["status"] != "ok" or v is None:
            continue
        others = " ".join(f"{k}={p}" for k, p in r["params"].items() if k != r["x_key"])
        lines[f"{r['provider']} [{others}]"].append((float(r["params"][r["x_key"]]), float(v)))
    return {k: sorted(v) for k, v in lines.items()}


def _panel(ax, recs, value: str, ylabel: str, title: str, empty_note: str, log: bool = True) -> None:
    series = _series(recs, value)
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    if not series:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, fontsize=8, wrap=True)
    elif log:
        ax.set_xscale("log")
        if all(y > 0 for pts in series.values() for _, y in pts):
            ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(recs[0]["x_key"] if recs else "")
    if series:
        ax.legend(fontsize=6)


def plot(records: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> list[str]:
    """One PNG per (op, dtype): time and TFLOP/s (GB/s where there is no FLOP count) vs the swept size,
    per mode; for the models also peak memory vs audio length. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(rec["op"], rec["dtype"])].append(rec)
    paths = []
    for (op, dtype), recs in groups.items():
        modes = list(dict.fromkeys(r["mode"] for r in recs))
        rate = "tflops" if any(r["tflops"] is not None for r in recs) else "gbps"
        rate_label = "TFLOP/s" if rate == "tflops" else "GB/s"
        panels = [("median_ms", "median ms", "time"), (rate, rate_label, rate_label)]
        if op == "models":
            panels.append(("peak_mem_mb", "peak memory MB", "memory"))
        fig, axes = plt.subplots(len(modes), len(panels), figsize=(5.5 * len(panels), 3.8 * len(modes)),
                                 squeeze=False)
        for i, mode in enumerate(modes):
            mode_recs = [r for r in recs if r["mode"] == mode]
            for j, (value, ylabel, what) in enumerate(panels):
                note = ("peak memory not measured on CPU" if value == "peak_mem_mb"
                        else f"no {ylabel} data (nothing ran)")
                _panel(axes[i][j], mode_recs, value, ylabel, f"{op} {dtype} {mode}: {what}", note,
                       log=value != "peak_mem_mb")
        fig.suptitle(f"{op} ({dtype}) on {recs[0]['device_name']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(os.fspath(out_dir), f"{op}_{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
