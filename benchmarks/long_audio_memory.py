"""Extra peak memory of one exact forward pass over long audio on CPU: transformers vs unispeech_fast.

Every (provider, duration) case runs in a fresh process that loads the same random UniSpeechSat-base
weights (fp32), makes the waveform, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``),
runs ``model(wave).last_hidden_state`` under ``torch.inference_mode()`` and reports
``VmHWM - VmRSS_before``: the memory the forward pass itself needed on top of weights and input. The
outputs of both providers are compared (max abs difference of ``last_hidden_state``).

    python benchmarks/long_audio_memory.py [--seconds 30,60,120] [--providers transformers,ours] [--json PATH]

Providers: ``transformers`` (sdpa), ``ours`` (the default path), ``ours_optimize_fp32`` and
``ours_optimize_bf16`` (:func:`unispeech_fast.optimize_for_inference` snapshots; the original model is
dropped before the measurement). Each of ours is compared with transformers when both ran.

Linux only (it reads /proc). Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, sys, time
import numpy as np
import torch
from safetensors.torch import load_file

provider, seconds, weights, out_path = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
OPTIMIZED = {"ours_optimize_fp32": torch.float32, "ours_optimize_bf16": torch.bfloat16}

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

state = load_file(weights)
if provider == "transformers":
    import transformers
    config = transformers.UniSpeechSatConfig()
    config._attn_implementation = "sdpa"
    model = transformers.UniSpeechSatModel(config)
else:
    import unispeech_fast as uf
    model = uf.UniSpeechSatModel(uf.UniSpeechSatConfig())
model.load_state_dict(state, strict=True)
model.eval()
del state
if provider in OPTIMIZED:
    model = uf.optimize_for_inference(model, OPTIMIZED[provider])  # the original is dropped: only the snapshot stays
wave = torch.randn(1, int(16000 * seconds), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(wave[:, :16000])  # warm-up: one-time allocations (thread pools, caches) are not counted
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    out = model(wave).last_hidden_state
    elapsed = time.perf_counter() - t0
    peak = status("VmHWM")
np.save(out_path, out[0].numpy())
print(json.dumps({"extra_peak_bytes": peak - before, "rss_before_bytes": before, "seconds_wall": elapsed,
                  "frames": out.shape[1]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", default="30,60,120", help="comma-separated audio durations")
    parser.add_argument("--providers", default="transformers,ours")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    durations = [float(s) for s in args.seconds.split(",")]
    providers = args.providers.split(",")

    import numpy as np
    import torch
    import transformers
    from safetensors.torch import save_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        weights = os.path.join(tmp, "weights.safetensors")
        save_file({k: v.contiguous() for k, v in transformers.UniSpeechSatModel(transformers.UniSpeechSatConfig()).state_dict().items()}, weights)
        for seconds in durations:
            outputs = {}
            for provider in providers:
                out_path = os.path.join(tmp, f"{provider}-{seconds}.npy")
                proc = subprocess.run([sys.executable, "-c", _CHILD, provider, str(seconds), weights, out_path],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    row = {"provider": provider, "audio_seconds": seconds, "error": proc.stderr.strip()[-500:]}
                else:
                    row = {"provider": provider, "audio_seconds": seconds, **json.loads(proc.stdout.strip().splitlines()[-1])}
                    outputs[provider] = np.load(out_path)
                rows.append(row)
                mib = row.get("extra_peak_bytes", float("nan")) / 2**20
                print(f"{provider:>18} {seconds:7.0f} s audio: extra peak {mib:9.1f} MiB, "
                      f"{row.get('seconds_wall', float('nan')):7.2f} s wall", flush=True)
            for provider in [p for p in outputs if p != "transformers" and "transformers" in outputs]:
                a, b = outputs[provider], outputs["transformers"]
                diff = float(np.abs(a - b).max())
                normwise = float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))
                rows.append({"compare": [provider, "transformers"], "audio_seconds": seconds,
                             "max_abs_diff_last_hidden_state": diff, "normwise_rel_err_last_hidden_state": normwise})
                print(f"{'':>12} {seconds:7.0f} s audio: max |{provider} - transformers| = {diff:.2e}, "
                      f"normwise {normwise:.1e}")
    if args.json:
        doc = {
            "benchmark": "long_audio_memory",
            "device": "cpu: " + _cpu_name() + f", {os.cpu_count()} logical cores, {torch.backends.cpu.get_cpu_capability()}",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": "UniSpeechSat-base (transformers defaults), random weights, fp32 weights and input, batch 1, "
                      "inference_mode; ours_optimize_* compute in the named dtype",
            "metric": "extra_peak_bytes = VmHWM after the forward - VmRSS before it (peak reset via /proc/self/clear_refs)",
            "rows": rows,
        }
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.json}")


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
