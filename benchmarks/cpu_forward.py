"""CPU forward timings: transformers' UniSpeechSatModel (sdpa) vs ours on the eager and auto backends.

UniSpeechSat-base config (transformers' defaults), random weights shared by both models, fp32, batch 1,
10 s of 16 kHz audio by default. Providers are run interleaved (one rep of each in turn) so background
load hits them alike; the table reports the median and the min over the reps, plus per-op timings at the
model's real shapes (feature extractor, positional conv, Gumbel quantizer) for eager and the cpp backend.

    python benchmarks/cpu_forward.py [--seconds 10] [--reps 7] [--threads N] [--json PATH]

``--json`` writes every row (section, provider, median/min/all times, speedup vs the section's baseline)
with the machine, versions, git commit and date, for ``benchmarks/results/``.

Run on an otherwise idle machine for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch


def _bench(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


_ROWS: list[dict] = []


def _report(title: str, times: dict[str, list[float]], baseline: str) -> None:
    base = statistics.median(times[baseline])
    for name, ts in times.items():
        _ROWS.append({"section": title, "provider": name, "median_s": statistics.median(ts), "min_s": min(ts),
                      "times_s": ts, "baseline": baseline, "speedup_vs_baseline": base / statistics.median(ts)})
    print(f"\n{title}")
    print(f"  {'provider':<28} {'median ms':>10} {'min ms':>9} {'speedup vs ' + baseline:>24}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<28} {med * 1e3:10.1f} {min(ts) * 1e3:9.1f} {base / med:23.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the rows and the environment to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import unispeech_fast as uf
    from unispeech_fast import _extension, dispatch
    from unispeech_fast.ops import _extension_ops as ext
    from unispeech_fast.ops.feature_extractor.extension import feature_extractor_ext
    from unispeech_fast.ops.gumbel_quantizer.extension import gumbel_quantizer_ext
    from unispeech_fast.ops.pos_conv.extension import pos_conv_ext
    from unispeech_fast.ops.feature_extractor import feature_extractor_ref
    from unispeech_fast.ops.gumbel_quantizer import gumbel_quantizer_ref
    from unispeech_fast.ops.pos_conv import pos_conv_ref

    status = _extension.status()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"extension: {'loaded' if status.loaded else 'NOT loaded: ' + status.reason}")
    if not ext.ensure_registered():
        raise SystemExit("the cpp backend needs the extension; build it with pip install --no-build-isolation -e .")

    torch.manual_seed(0)
    hf_config = transformers.UniSpeechSatConfig()
    hf_config._attn_implementation = "sdpa"
    hf = transformers.UniSpeechSatModel(hf_config).eval()
    ours = uf.UniSpeechSatModel(uf.UniSpeechSatConfig()).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    if missing or unexpected:
        print(f"state dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wave = torch.randn(1, int(16000 * args.seconds))

    def run_ours(name):
        def fn():
            with torch.inference_mode(), dispatch.backend(name):
                return ours(wave).last_hidden_state
        return fn

    def run_hf():
        with torch.inference_mode():
            return hf(wave).last_hidden_state

    with torch.inference_mode():
        ref = run_hf()
        for name in ("eager", "auto"):
            err = (run_ours(name)() - ref).abs().max().item()
            print(f"max |ours({name}) - transformers| = {err:.2e}")
            _ROWS.append({"section": "accuracy", "provider": f"ours {name}", "max_abs_diff_vs_transformers": err})
    times = _bench({"transformers sdpa": run_hf, "ours eager": run_ours("eager"), "ours auto": run_ours("auto")}, args.reps)
    _report(f"whole model, {args.seconds:g} s audio, batch 1, fp32", times, "transformers sdpa")

    # ------------------------------------------------------------------ per op, at the model's shapes
    fe = ours.feature_extractor
    layers = list(fe.conv_layers)
    fe_args = dict(
        conv_weights=[layer.conv.weight for layer in layers],
        conv_biases=[layer.conv.bias for layer in layers],
        norm_weights=[None if layer.layer_norm is None else layer.layer_norm.weight for layer in layers],
        norm_biases=[None if layer.layer_norm is None else layer.layer_norm.bias for layer in layers],
        conv_strides=[layer.conv.stride[0] for layer in layers],
        norm_type=fe.norm_type,
    )
    with torch.inference_mode():
        feats = hf.feature_extractor(wave)
        times = _bench({
            "transformers feature_encoder": lambda: hf.feature_extractor(wave),
            "eager feature_extractor": lambda: feature_extractor_ref(wave, **fe_args),
            "cpp feature_extractor": lambda: feature_extractor_ext(wave, **fe_args),
            "ours feature_encoder (auto)": lambda: ours.feature_extractor(wave),  # as the model runs it: tiled on CPU
        }, args.reps)
    _report(f"feature extractor ({feats.shape[-1]} frames)", times, "transformers feature_encoder")

    pc = ours.encoder.pos_conv_embed
    hidden = torch.randn(1, feats.shape[-1], hf_config.hidden_size)
    pc_args = dict(weight_g=pc.weight_g, weight_v=pc.weight_v, bias=pc.conv.bias, groups=pc.groups)
    with torch.inference_mode():
        times = _bench({
            "transformers pos_conv_embed": lambda: hidden + hf.encoder.pos_conv_embed(hidden),
            "eager pos_conv": lambda: pos_conv_ref(hidden, **pc_args),
            "cpp pos_conv": lambda: pos_conv_ext(hidden, **pc_args),
        }, args.reps)
    _report(f"positional conv (+ residual), {tuple(hidden.shape)}", times, "transformers pos_conv_embed")

    groups, per_group = hf_config.num_codevector_groups, hf_config.num_codevectors_per_group
    logits = torch.randn(1, feats.shape[-1], groups * per_group)
    codevectors = torch.randn(1, groups * per_group, hf_config.codevector_dim // groups)
    with torch.inference_mode():
        times = _bench({
            "eager gumbel (eval)": lambda: gumbel_quantizer_ref(logits, codevectors, groups, 2.0, False),
            "cpp gumbel (eval)": lambda: gumbel_quantizer_ext(logits, codevectors, groups, 2.0, False),
            "eager gumbel (sample)": lambda: gumbel_quantizer_ref(logits, codevectors, groups, 2.0, True),
            "cpp gumbel (sample)": lambda: gumbel_quantizer_ext(logits, codevectors, groups, 2.0, True),
        }, args.reps)
    _report(f"gumbel quantizer, logits {tuple(logits.shape)}", times, "eager gumbel (eval)")
    print("\nauto backend table (cpu):")
    print(dispatch.format_backend_table(("cpu",)))
    if args.json:
        _write_json(args, transformers.__version__)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_json(args, transformers_version: str) -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    doc = {
        "benchmark": "cpu_forward",
        "device": f"cpu: {_cpu_name()}, {os.cpu_count()} logical cores, {torch.backends.cpu.get_cpu_capability()}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": "UniSpeechSat-base (transformers defaults), random weights, fp32, batch 1",
        "seconds_of_audio": args.seconds,
        "reps": args.reps,
        "rows": _ROWS,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
