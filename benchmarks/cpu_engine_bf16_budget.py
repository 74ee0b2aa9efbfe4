"""Where ``optimize_for_inference(dtype=torch.bfloat16)`` spends its error budget, and what each part buys.

The issue's bfloat16 target is a normwise relative error of ``last_hidden_state`` against the float32
model of at most 5e-3. The shipped snapshot runs the encoder layers' matmuls and attention in bfloat16
and keeps the feature encoder, the positional conv and the feature projection in float32. This script
turns those three on in bfloat16 one at a time (then all together) on top of the shipped snapshot, adds
the int8 option the issue asks to measure (torch's dynamic int8 quantisation of the encoder's Linear
layers, on the default path), and prints, per variant, the normwise and max abs error against the float32 default path and the median
forward time (interleaved runs: one forward of each variant in turn).

UniSpeechSat-base (transformers defaults), random weights (seed 0), batch 1, random waveform.

    python benchmarks/cpu_engine_bf16_budget.py [--seconds 4] [--reps 5] [--threads N] [--json PATH]

Timings on a loaded machine are indicative only; the errors do not depend on load.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import unispeech_fast as uf
    from unispeech_fast import inference

    torch.manual_seed(0)
    model = uf.UniSpeechSatModel(uf.UniSpeechSatConfig()).eval()
    wave = torch.randn(1, int(16000 * args.seconds), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(wave).last_hidden_state.double()

    bf16 = torch.bfloat16
    parts = {
        "feature encoder": lambda snap: setattr(snap, "feature_extractor",
                                                inference.InferenceFeatureEncoder(model.feature_extractor, bf16)),
        "positional conv": lambda snap: setattr(snap.encoder, "pos_conv_embed",
                                                inference.InferencePositionalConv(model.encoder.pos_conv_embed, bf16)),
        "feature projection": lambda snap: setattr(snap, "feature_projection",
                                                   inference.InferenceFeatureProjection(model.feature_projection, bf16)),
    }
    variants = {"optimize fp32": uf.optimize_for_inference(model, torch.float32),
                "optimize bf16 (shipped)": uf.optimize_for_inference(model, bf16)}
    for name, switch in parts.items():
        snap = uf.optimize_for_inference(model, bf16)
        switch(snap)
        variants[f"+ {name} in bf16"] = snap
    everything = uf.optimize_for_inference(model, bf16)
    for switch in parts.values():
        switch(everything)
    variants["+ all three in bf16"] = everything
    # The issue's int8 option, measured to decide whether to offer it (it is offered only at <= 2x bf16's error
    # and faster than bf16): torch's dynamic quantisation of the encoder's Linear layers (int8 weights,
    # per-tensor int8 activations per call, VNNI) on the default path.
    int8 = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices (quantized tensors, the move to torchao)
        int8.encoder = torch.ao.quantization.quantize_dynamic(int8.encoder, {torch.nn.Linear}, dtype=torch.qint8)
    variants["int8 dynamic (encoder Linear layers)"] = int8

    rows = {}
    with torch.no_grad():  # the snapshots run without autograd anyway; the int8 model is a plain one
        for name, snap in variants.items():
            out = snap(wave).last_hidden_state.double()
            rows[name] = {"normwise_rel_err": ((out - ref).norm() / ref.norm()).item(),
                          "max_abs_diff": (out - ref).abs().max().item(), "times_s": []}
        for _ in range(args.reps):
            for name, snap in variants.items():
                t0 = time.perf_counter()
                snap(wave)
                rows[name]["times_s"].append(time.perf_counter() - t0)
    base = statistics.median(rows["optimize bf16 (shipped)"]["times_s"])
    print(f"UniSpeechSat-base, {args.seconds:g} s audio, {torch.get_num_threads()} threads, {args.reps} interleaved reps")
    print(f"{'variant':<36} {'normwise err':>12} {'max abs':>9} {'median ms':>10} {'vs shipped bf16':>16}")
    for name, row in rows.items():
        row["median_s"] = statistics.median(row["times_s"])
        print(f"{name:<36} {row['normwise_rel_err']:12.2e} {row['max_abs_diff']:9.2e} {row['median_s'] * 1e3:10.1f} "
              f"{base / row['median_s']:15.2f}x")
    if args.json:
        doc = {"benchmark": "cpu_engine_bf16_budget", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "seconds": args.seconds, "reps": args.reps,
               "reference": "unispeech_fast default path, float32", "rows": rows}
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
