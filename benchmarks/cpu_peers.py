"""CPU inference against the peers: transformers, torch.compile, ONNX Runtime, OpenVINO and ours.

UniSpeechSat-base (transformers' default config), random weights (seeded, shared by every provider
through one saved checkpoint), batch 1, float32 input. Providers:

* ``transformers sdpa fp32`` (the baseline and the accuracy reference), ``torch.compile(transformers)``;
* ``onnxruntime fp32``: the transformers model exported with ``torch.onnx.export`` (dynamo exporter,
  the legacy one if that fails), ``ORT_ENABLE_ALL``;
* ``openvino fp32`` (``INFERENCE_PRECISION_HINT=f32``) and ``openvino default`` (its default precision:
  bf16 on CPUs with AVX512_BF16/AMX), from ``openvino.convert_model`` of the transformers model;
* ``ours default`` (the default path, auto backend), ``ours optimize fp32`` and ``ours optimize bf16``
  (:func:`unispeech_fast.optimize_for_inference`).

Each provider runs in its own subprocess, so its peak RSS (``VmHWM`` over the timed runs, reset after
loading and warm-up; the peak while loading is recorded too) is its own; exports and conversions happen
in separate preparation subprocesses beforehand, and the ONNX Runtime and OpenVINO workers never import
torch. The parent
drives the workers round-robin, one forward each in turn, so background load hits them alike, and
reports per provider and audio length: median time, speedup against transformers, max abs and normwise
error of ``last_hidden_state`` against transformers fp32, peak RSS, and achieved GFLOP/s (model FLOPs
from :func:`unispeech_fast.bench.flops.model_flops`) against this machine's oneDNN matmul peak, measured
first in its own subprocess. Missing peers (``pip install -e .[peers]``) are skipped and reported.

    python benchmarks/cpu_peers.py [--seconds 10 30] [--reps 7] [--threads N] [--json PATH] [--plot PATH]
    python benchmarks/cpu_peers.py --quick      # end-to-end check: 10 s only, 2 reps, smoke-named JSON

Run on an otherwise idle machine for numbers worth quoting; ``--quick`` results are a smoke check only.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE_RATE = 16000
HERE = Path(__file__).resolve().parent

PROVIDERS = {
    # name: (python modules it needs, whether the prepared artifact is onnx / openvino IR)
    "transformers sdpa fp32": (("transformers",), None),
    "torch.compile(transformers)": (("transformers",), None),
    "onnxruntime fp32": (("transformers", "onnx", "onnxruntime"), "onnx"),
    "openvino fp32": (("transformers", "openvino"), "openvino"),
    "openvino default": (("transformers", "openvino"), "openvino"),
    "ours default": ((), None),
    "ours optimize fp32": ((), None),
    "ours optimize bf16": ((), None),
}
BASELINE = "transformers sdpa fp32"


# ------------------------------------------------------------------------------------------ helpers
def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_info() -> dict:
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return {"cpu_model": model, "isa_flags": isa, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "logical_cpus": os.cpu_count()}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "onnxruntime", "openvino", "onnx", "unispeech_fast"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name)


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class _LastHidden:
    """Wraps a transformers model so exporters see one tensor output."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_values):
                return self.inner(input_values).last_hidden_state

        return Wrapper(model).eval()


def _load_transformers(workdir: Path):
    import transformers

    return transformers.UniSpeechSatModel.from_pretrained(workdir / "weights", attn_implementation="sdpa").eval()


def _input_np(workdir: Path, seconds: float):
    import numpy as np

    return np.load(workdir / f"input_{seconds:g}s.npy")


def _input(workdir: Path, seconds: float):
    import torch

    return torch.from_numpy(_input_np(workdir, seconds))


# ------------------------------------------------------------------------------------------ subprocess roles
def prepare_weights(workdir: Path, seconds_list: list[float]) -> None:
    """Random UniSpeechSat-base weights (seed 0) saved by transformers, and one seeded input per length."""
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.UniSpeechSatModel(transformers.UniSpeechSatConfig()).eval()
    model.save_pretrained(workdir / "weights")
    g = torch.Generator().manual_seed(1)
    for seconds in seconds_list:
        np.save(workdir / f"input_{seconds:g}s.npy", torch.randn(1, int(seconds * SAMPLE_RATE), generator=g).numpy())


def prepare_export(workdir: Path, kind: str, seconds: float) -> str:
    """Export the transformers model at this input length: ONNX file or OpenVINO IR. Returns a note."""
    import torch

    model = _LastHidden(_load_transformers(workdir))
    x = _input(workdir, seconds)
    if kind == "onnx":
        path = workdir / f"model_{seconds:g}s.onnx"
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input_values"],
                              output_names=["last_hidden_state"], external_data=False)
            return "torch.onnx.export(dynamo=True)"
        except Exception as exc:  # noqa: BLE001  (record and fall back to the TorchScript exporter)
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input_values"],
                              output_names=["last_hidden_state"], opset_version=17)
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
            return f"torch.onnx.export(dynamo=False); the dynamo exporter failed: {why}"
    import openvino as ov

    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=x)
    ov.save_model(ov_model, str(workdir / f"model_{seconds:g}s.xml"), compress_to_fp16=False)
    return "openvino.convert_model(torch module)"


def measure_matmul_peak(threads: int, reps: int) -> dict:
    """Best oneDNN matmul throughput (prepacked weight, 2048^3) in fp32 and bf16, GFLOP/s."""
    import torch

    _set_threads(threads)
    n = 2048
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(n, n).to(dtype)
        w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, n).to(dtype))
        op = torch.ops.mkldnn._linear_pointwise.default
        op(x, w, None, "none", [], "")
        best = float("inf")
        for _ in range(max(reps, 3)):
            t0 = time.perf_counter()
            op(x, w, None, "none", [], "")
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best / 1e9
    return out


def _build(provider: str, workdir: Path, seconds: float, threads: int):
    """Returns ``run() -> last_hidden_state as a numpy array`` and a note."""
    import numpy as np

    if provider == "onnxruntime fp32":  # ONNX Runtime and OpenVINO workers never import torch
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(workdir / f"model_{seconds:g}s.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: _input_np(workdir, seconds)}
        return (lambda: session.run(None, feed)[0]), "ORT_ENABLE_ALL, CPUExecutionProvider"
    if provider.startswith("openvino"):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads}
        if provider == "openvino fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = ov.Core().compile_model(str(workdir / f"model_{seconds:g}s.xml"), "CPU", config)
        request = compiled.create_infer_request()
        feed = _input_np(workdir, seconds)
        note = f"INFERENCE_PRECISION_HINT={compiled.get_property('INFERENCE_PRECISION_HINT')}"
        return (lambda: np.array(request.infer([feed])[0])), note
    import torch

    _set_threads(threads)
    x = _input(workdir, seconds)
    if provider in ("transformers sdpa fp32", "torch.compile(transformers)"):
        model = _load_transformers(workdir)
        note = "attn_implementation=sdpa"
        if provider.startswith("torch.compile"):
            model = torch.compile(model)
            note += ", torch.compile default mode"

        def run():
            with torch.inference_mode():
                return model(x).last_hidden_state.numpy()
        return run, note
    import unispeech_fast as uf

    model = uf.UniSpeechSatModel.from_pretrained(workdir / "weights").eval()
    note = "default path, auto backend"
    if provider != "ours default":
        dtype = torch.bfloat16 if provider.endswith("bf16") else torch.float32
        model = uf.optimize_for_inference(model, dtype)
        note = f"optimize_for_inference(dtype={dtype})"

    def run():
        with torch.no_grad():
            return model(x).last_hidden_state.numpy()
    return run, note


def worker(provider: str, workdir: Path, seconds: float, threads: int, warmup: int) -> None:
    """Line protocol on stdin/stdout: prints READY once built and warmed up (its output saved), then one
    time in seconds per ``run`` line, and its peak RSS as JSON on ``quit``: ``peak_rss_mib`` over the
    timed runs (``VmHWM`` reset after the warm-up, so it counts the resident weights and the forward's
    working set, not an export or a one-off packing step) and ``build_peak_rss_mib`` up to then."""
    import gc

    import numpy as np

    run, note = _build(provider, workdir, seconds, threads)
    out = run()
    for _ in range(warmup):
        run()
    np.save(workdir / f"out_{_slug(provider)}_{seconds:g}s.npy", np.asarray(out, dtype=np.float32))
    del out
    gc.collect()
    build_peak = _peak_rss_mib()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    print(json.dumps({"ready": True, "note": note}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            t0 = time.perf_counter()
            run()
            print(json.dumps({"time_s": time.perf_counter() - t0}), flush=True)
        else:
            break
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "build_peak_rss_mib": build_peak}), flush=True)


# ------------------------------------------------------------------------------------------ the parent
def _sub(args: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)


def _start_worker(provider: str, workdir: Path, seconds: float, threads: int, warmup: int):
    # glibc's default allocator on purpose (no MALLOC_MMAP_THRESHOLD_ as in unispeech_fast.bench.memory):
    # these workers are timed too, and a low mmap threshold would page-fault every large tensor.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = workdir / f"worker_{_slug(provider)}_{seconds:g}s.log"  # a file, so a chatty worker cannot block on a pipe
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, __file__, "--role", "worker", "--provider", provider,
                                 "--workdir", str(workdir), "--seconds", f"{seconds:g}", "--threads", str(threads),
                                 "--warmup", str(warmup)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        err = log.read_text()
        return None, f"worker failed: {err.strip().splitlines()[-1] if err.strip() else 'no output'}"
    return proc, json.loads(line)["note"]


def _ask(proc, command: str) -> dict:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS), metavar="NAME")
    parser.add_argument("--quick", action="store_true", help="10 s only, 2 reps: an end-to-end check of the script")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    # internal: subprocess roles
    parser.add_argument("--role", choices=["weights", "export", "peak", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "weights":
        return prepare_weights(args.workdir, args.seconds)
    if args.role == "export":
        _set_threads(args.threads)
        print(json.dumps({"note": prepare_export(args.workdir, args.kind, args.seconds[0])}))
        return None
    if args.role == "peak":
        print(json.dumps(measure_matmul_peak(args.threads, args.reps)))
        return None
    if args.role == "worker":
        return worker(args.provider, args.workdir, args.seconds[0], args.threads, args.warmup)

    if args.quick:
        args.seconds, args.reps = [10.0], min(args.reps, 2)
    today = datetime.date.today().isoformat()
    default_name = f"cpu_peers_smoke_{today}.json" if args.quick else f"cpu_peers_{today}.json"
    json_path = args.json or HERE / "results" / default_name
    plot_path = args.plot or json_path.with_suffix(".png")

    import numpy as np
    import unispeech_fast as uf
    from unispeech_fast.bench.flops import model_flops

    config = uf.UniSpeechSatConfig()
    skipped: dict[str, str] = {}
    providers = []
    for name in args.providers:
        missing = _missing(PROVIDERS[name][0])
        if missing:
            skipped[name] = f"not installed: {', '.join(missing)} (pip install -e .[peers])"
            print(f"skipping {name}: {skipped[name]}")
        else:
            providers.append(name)
    if BASELINE not in providers:
        raise SystemExit(f"the baseline {BASELINE!r} is needed (transformers installed, in --providers)")

    peak = json.loads(_sub(["--role", "peak", "--threads", str(args.threads), "--reps", str(args.reps)]).stdout)
    print(f"oneDNN matmul peak (2048^3, prepacked): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    rows, notes = [], {}
    with tempfile.TemporaryDirectory(prefix="cpu_peers_") as tmp:
        workdir = Path(tmp)
        done = _sub(["--role", "weights", "--workdir", tmp, "--seconds", *[f"{s:g}" for s in args.seconds]])
        if done.returncode:
            raise SystemExit(f"preparing the weights failed:\n{done.stderr}")
        for seconds in args.seconds:
            active = list(providers)
            for kind in ("onnx", "openvino"):
                users = [p for p in active if PROVIDERS[p][1] == kind]
                if not users:
                    continue
                done = _sub(["--role", "export", "--kind", kind, "--workdir", tmp, "--seconds", f"{seconds:g}",
                             "--threads", str(args.threads)])
                if done.returncode:
                    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"
                    why = f"{kind} export failed: {last}"
                    for p in users:
                        skipped[f"{p} @ {seconds:g}s"] = why
                        active.remove(p)
                    print(why)
                else:
                    notes[f"{kind} export @ {seconds:g}s"] = json.loads(done.stdout.strip().splitlines()[-1])["note"]
            workers = {}
            for p in active:
                proc, note = _start_worker(p, workdir, seconds, args.threads, args.warmup)
                if proc is None:
                    skipped[f"{p} @ {seconds:g}s"] = note
                    print(f"{p} @ {seconds:g}s: {note}")
                else:
                    workers[p] = proc
                    notes[p] = note
            times = {p: [] for p in workers}
            for _ in range(args.reps):
                for p, proc in workers.items():
                    times[p].append(_ask(proc, "run")["time_s"])
            rss = {p: _ask(proc, "quit") for p, proc in workers.items()}
            for proc in workers.values():
                proc.wait(timeout=60)
            outputs = {p: np.load(workdir / f"out_{_slug(p)}_{seconds:g}s.npy") for p in workers}
            ref = outputs[BASELINE].astype(np.float64)
            flops = model_flops(config, 1, int(seconds * SAMPLE_RATE))
            base = statistics.median(times[BASELINE])
            for p in workers:
                med = statistics.median(times[p])
                # bf16 providers against the bf16 matmul peak (OpenVINO's default says which it chose)
                peak_kind = "bf16" if ("bfloat16" in notes[p] or "bf16" in notes[p]) else "fp32"
                diff = outputs[p].astype(np.float64) - ref
                rows.append({
                    "provider": p, "seconds": seconds, "median_s": med, "min_s": min(times[p]), "times_s": times[p],
                    "speedup_vs_transformers": base / med,
                    "max_abs_diff": float(np.abs(diff).max()),
                    "normwise_rel_err": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
                    "peak_rss_mib": rss[p]["peak_rss_mib"], "build_peak_rss_mib": rss[p]["build_peak_rss_mib"],
                    "gflops_per_s": flops / med / 1e9,
                    "pct_of_matmul_peak": 100 * flops / med / 1e9 / peak[peak_kind], "matmul_peak_used": peak_kind,
                    "note": notes[p],
                })
            print(f"\n{seconds:g} s of audio, batch 1, {args.threads} threads, {args.reps} interleaved reps "
                  f"({flops / 1e9:.0f} GFLOP per forward)")
            print(f"  {'provider':<30} {'median ms':>9} {'speedup':>8} {'max abs':>9} {'normwise':>9} "
                  f"{'RSS MiB':>8} {'GFLOP/s':>8} {'% peak':>7}")
            for r in rows:
                if r["seconds"] == seconds:
                    print(f"  {r['provider']:<30} {r['median_s'] * 1e3:9.0f} {r['speedup_vs_transformers']:7.2f}x "
                          f"{r['max_abs_diff']:9.1e} {r['normwise_rel_err']:9.1e} {r['peak_rss_mib']:8.0f} "
                          f"{r['gflops_per_s']:8.0f} {r['pct_of_matmul_peak']:6.0f}%")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")

    result = {
        "benchmark": "cpu_peers", "quick_smoke_run": bool(args.quick), "date": datetime.datetime.now().isoformat(),
        "device": {**_cpu_info(), "threads": args.threads}, "versions": _versions(),
        "model": "UniSpeechSat-base, random weights",
        "batch": 1, "reps": args.reps, "matmul_peak_gflops": peak, "rows": rows, "skipped": skipped, "notes": notes,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {json_path}")
    _plot(rows, plot_path, result)


def _plot(rows: list[dict], path: Path, result: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    lengths = sorted({r["seconds"] for r in rows})
    names = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(lengths)
    for i, seconds in enumerate(lengths):
        by = {r["provider"]: r["speedup_vs_transformers"] for r in rows if r["seconds"] == seconds}
        ax.barh([j + i * width for j in range(len(names))], [by.get(n, 0.0) for n in names], height=width,
                label=f"{seconds:g} s audio")
    ax.set_yticks([j + width * (len(lengths) - 1) / 2 for j in range(len(names))], names)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("speedup vs transformers sdpa fp32 (median, batch 1)")
    title = f"UniSpeechSat-base on {result['device']['cpu_model']}, {result['device']['threads']} threads"
    ax.set_title(title + (" (SMOKE RUN)" if result["quick_smoke_run"] else ""), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
