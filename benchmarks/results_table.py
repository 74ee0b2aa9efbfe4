"""Print the README's results tables (markdown) from the committed files in benchmarks/results/.

    python benchmarks/results_table.py            # paste the output into README.md "Results"

Every row names the device it was measured on; nothing here is typed in by hand.
"""

from __future__ import annotations

import glob
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _load(pattern: str) -> list[tuple[str, dict]]:
    return [(os.path.relpath(p, os.path.dirname(HERE)), json.load(open(p))) for p in sorted(glob.glob(os.path.join(HERE, pattern)))]


def _measured_table(header: str, align: str, doc: dict, row_line) -> list[str]:
    """A markdown table after a blank line: ``header``, ``align``, then ``row_line(row)`` for each row of ``doc`` that
    was measured (has ``median_s``; a row that failed has not), then a blank line."""
    return ["", header, align] + [row_line(row) for row in doc["rows"] if "median_s" in row] + [""]


def cpu_forward() -> list[str]:
    lines = []
    for path, doc in _load("cpu_forward_*.json"):
        lines.append(f"CPU forward, {doc['config']}, {doc['seconds_of_audio']:g} s of audio, {doc['threads']} threads, "
                     f"median of {doc['reps']} interleaved runs. Device: {doc['device']}; torch {doc['torch']}, "
                     f"transformers {doc['transformers']}; {doc['date']} (`{path}`).")
        lines += _measured_table(
            "| section | provider | median ms | speed-up vs baseline |", "| --- | --- | ---: | ---: |", doc,
            lambda row: f"| {row['section']} | {row['provider']} | {row['median_s'] * 1e3:.1f} | "
                        f"{row['speedup_vs_baseline']:.2f}x vs {row['baseline']} |")
        accuracy = [r for r in doc["rows"] if "max_abs_diff_vs_transformers" in r]
        if accuracy:
            lines.append("Max abs difference of `last_hidden_state` from transformers: " + ", ".join(
                f"{r['provider']} {r['max_abs_diff_vs_transformers']:.1e}" for r in accuracy) + ".")
            lines.append("")
    return lines


def cpu_peers() -> list[str]:
    """``benchmarks/cpu_peers.py`` files: every provider at every audio length, against transformers fp32."""
    lines = []
    for path, doc in _load("cpu_peers_*.json"):
        if doc.get("quick_smoke_run"):
            continue
        dev, peak = doc["device"], doc["matmul_peak_gflops"]
        lines.append(f"CPU inference against the peers, {doc['model']}, batch {doc['batch']}, {dev['threads']} threads, "
                     f"median of {doc['reps']} interleaved runs, one process per provider. Device: {dev['cpu_model']}, "
                     f"{dev['logical_cpus']} logical cores, {dev['torch_cpu_capability']} ({', '.join(dev['isa_flags'])}); "
                     f"oneDNN matmul peak measured there: fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s; "
                     f"torch {doc['versions']['torch']}; {doc['date'][:19]}, commit {doc['versions']['git_commit'][:7]} (`{path}`).")
        lines += _measured_table(
            "| audio | provider | median ms | vs transformers | max abs diff | normwise error | peak RSS MiB | GFLOP/s (% of peak) |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |", doc,
            lambda row: f"| {row['seconds']:g} s | {row['provider']} | {row['median_s'] * 1e3:.0f} | "
                        f"{row['speedup_vs_transformers']:.2f}x | {row['max_abs_diff']:.1e} | {row['normwise_rel_err']:.1e} | "
                        f"{row['peak_rss_mib']:.0f} | {row['gflops_per_s']:.0f} ({row['pct_of_matmul_peak']:.0f}% {row['matmul_peak_used']}) |")
    return lines


def long_audio() -> list[str]:
    lines = []
    for path, doc in _load("long_audio_memory_*.json"):
        lines.append(f"Extra peak memory of one forward pass (VmHWM - RSS before), {doc['config']}. "
                     f"Device: {doc['device']}; torch {doc['torch']}, transformers {doc['transformers']}; "
                     f"{doc['date']} (`{path}`)." + (f" {doc['note']}" if doc.get("note") else ""))
        lines.append("")
        lines.append("| audio | transformers (sdpa) | unispeech_fast (auto) | ratio | wall s (transformers / ours) | max abs diff |")
        lines.append("| ---: | ---: | ---: | ---: | ---: | ---: |")
        by = {}
        for row in doc["rows"]:
            # A comparison row is keyed by the provider compared with transformers ("compare:ours", ...).
            key = row.get("provider") or "compare:" + next(p for p in row["compare"] if p != "transformers")
            by.setdefault(row["audio_seconds"], {})[key] = row
        for seconds, rows in sorted(by.items()):
            hf, ours, cmp_ = rows.get("transformers", {}), rows.get("ours", {}), rows.get("compare:ours", {})
            if "extra_peak_bytes" not in hf or "extra_peak_bytes" not in ours:
                lines.append(f"| {seconds:g} s | {hf.get('error', 'n/a')[:60]} | {ours.get('error', 'n/a')[:60]} | | | |")
                continue
            a, b = hf["extra_peak_bytes"] / 2**20, ours["extra_peak_bytes"] / 2**20
            lines.append(f"| {seconds:g} s | {a:.0f} MiB | {b:.0f} MiB | {a / b:.1f}x | "
                         f"{hf['seconds_wall']:.1f} / {ours['seconds_wall']:.1f} | "
                         f"{cmp_.get('max_abs_diff_last_hidden_state', float('nan')):.1e} |")
        lines.append("")
        optimized = [(seconds, name, row, rows.get("compare:" + name, {}), rows.get("ours", {}))
                     for seconds, rows in sorted(by.items()) for name, row in rows.items()
                     if name.startswith("ours_optimize") and "extra_peak_bytes" in row]
        if optimized:
            lines.append("| audio | `optimize_for_inference` | extra peak | vs unispeech_fast (auto) | max abs diff | normwise |")
            lines.append("| ---: | --- | ---: | ---: | ---: | ---: |")
            for seconds, name, row, cmp_, ours in optimized:
                mib = row["extra_peak_bytes"] / 2**20
                ratio = f"{ours['extra_peak_bytes'] / row['extra_peak_bytes']:.2f}x less" if "extra_peak_bytes" in ours else ""
                lines.append(f"| {seconds:g} s | {name.removeprefix('ours_optimize_')} | {mib:.0f} MiB | {ratio} | "
                             f"{cmp_.get('max_abs_diff_last_hidden_state', float('nan')):.1e} | "
                             f"{cmp_.get('normwise_rel_err_last_hidden_state', float('nan')):.1e} |")
            lines.append("")
        growth = _growth(by)
        if growth:
            lines.append(growth)
            lines.append("")
    return lines


def _growth(by: dict) -> str:
    """Extra peak memory added per output frame between the 60 s row (or the shortest above it) and the
    longest row, per provider: a constant per-frame cost is linear growth."""
    long = sorted(s for s, rows in by.items() if s >= 60 and all("extra_peak_bytes" in rows.get(p, {})
                                                                  for p in ("transformers", "ours")))
    if len(long) < 2:
        return ""
    lo, hi = by[long[0]], by[long[-1]]
    parts = []
    for provider, label in (("transformers", "transformers"), ("ours", "unispeech_fast")):
        frames = hi[provider]["frames"] - lo[provider]["frames"]
        per_frame = (hi[provider]["extra_peak_bytes"] - lo[provider]["extra_peak_bytes"]) / frames
        parts.append(f"{label} {per_frame / 1024:.1f} KiB per frame ({per_frame / 4 / 768:.1f} x hidden 768 fp32)")
    return (f"Growth of the extra peak from {long[0]:g} s to {long[-1]:g} s of audio, per output frame "
            f"(20 ms): " + "; ".join(parts) + ".")


def op_benchmarks() -> list[str]:
    """``unispeech-fast bench`` result folders: per op, its largest shape, every provider that ran, in
    inference (fwd) and training (fwd_bwd) mode, with the speed-up over our eager backend."""
    lines = []
    for path, rows in _load("*/results.json"):
        ok = [r for r in rows if r.get("status") == "ok" and r.get("mode") in ("fwd", "fwd_bwd")]
        if not ok:
            continue
        first = ok[0]
        lines.append(f"Op benchmarks (`unispeech-fast bench`), largest shape of each op's grid. Device: "
                     f"{first['device_name']}; torch {first['torch']}, triton {first['triton']}, transformers "
                     f"{first['transformers']}; {first['date']}, commit {str(first['git_commit'])[:7]} (`{path}`).")
        lines.append("")
        memory = any(r.get("peak_mem_mb") is not None for r in ok)  # --cpu-memory runs record the RSS peak
        lines.append("| op | shape | dtype | mode | provider | median ms | vs eager |" + (" peak MiB |" if memory else ""))
        lines.append("| --- | --- | --- | --- | --- | ---: | ---: |" + (" ---: |" if memory else ""))
        for op in dict.fromkeys(r["op"] for r in ok):
            op_rows = [r for r in ok if r["op"] == op]
            largest = max(op_rows, key=lambda r: (r["params"].get(r["x_key"], 0), r["shape"]))["shape"]
            for mode in ("fwd", "fwd_bwd"):
                sel = [r for r in op_rows if r["shape"] == largest and r["mode"] == mode]
                eager = {r["dtype"]: r["median_ms"] for r in sel if r["provider"] == "eager"}
                for r in sel:
                    base = eager.get(r["dtype"])
                    ratio = f"{base / r['median_ms']:.2f}x" if base else "n/a"
                    mem = f" {r['peak_mem_mb']:.1f} |" if memory and r.get("peak_mem_mb") is not None else (" n/a |" if memory else "")
                    lines.append(f"| {op} | {largest} | {r['dtype']} | {mode} | {r['provider']} | "
                                 f"{r['median_ms']:.2f} | {ratio} |" + mem)
        lines.append("")
    return lines


if __name__ == "__main__":
    print("\n".join(cpu_forward() + cpu_peers() + long_audio() + op_benchmarks()))
