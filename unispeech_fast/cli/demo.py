"""``unispeech-fast demo``: a randomly initialised UniSpeechSatModel on random audio, timed. No
checkpoint or network is needed."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, SAMPLE_RATE, add_command, backend_from_environment, error, positive

__all__ = ["add_parser", "cmd_demo", "tiny_config"]


def tiny_config():
    """A small UniSpeech-SAT config (same conv strides, so 20 ms frames) for quick runs and tests."""
    from ..configuration import UniSpeechSatConfig

    return UniSpeechSatConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .. import (BackendNotSupportedError, UniSpeechSatConfig, UniSpeechSatModel, VerificationError, backend,
                   current_backend)
    from ..dispatch import format_backend_table

    problem = backend_from_environment(args)
    if problem is not None:
        return error(problem, EXIT_USAGE)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available here (see `python -m unispeech_fast info`)",
              file=sys.stderr)
        return EXIT_USAGE
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.model == "base":
        config, config_desc = UniSpeechSatConfig(), "transformers' default UniSpeechSatConfig()"
    else:
        config, config_desc = tiny_config(), "tiny config (hidden 64, 2 layers, 2 heads, 32 conv channels)"
    samples = int(round(args.seconds * SAMPLE_RATE))
    if samples < config.receptive_field():
        print(f"error: --seconds {args.seconds:g} gives {samples} samples, fewer than the "
              f"{config.receptive_field()} the model needs for one frame", file=sys.stderr)
        return EXIT_USAGE

    torch.manual_seed(args.seed)
    model = UniSpeechSatModel(config).to(device).eval()
    audio = torch.randn(args.batch, samples, device=device)

    if device.type == "cpu":
        threads = torch.get_num_threads()
        where = f"cpu, {threads} thread{'s' if threads != 1 else ''}"
    else:
        where = f"{device.type} ({torch.cuda.get_device_name(device)})"
    print(f"model             UniSpeechSatModel, randomly initialised (seed {args.seed}), {config_desc}")
    print(f"parameters        {model.num_parameters():,}")
    print(f"input_values      {list(audio.shape)} float32, {samples / SAMPLE_RATE:g} s of random audio at "
          f"{SAMPLE_RATE // 1000} kHz per row")
    try:
        with backend(args.backend), torch.inference_mode():
            requested = current_backend()
            timings = []
            for _ in range(1 + args.runs):
                _sync(device)
                start = time.perf_counter()
                out = model(audio)
                _sync(device)
                timings.append(time.perf_counter() - start)
    except BackendNotSupportedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except VerificationError as exc:  # UNISPEECH_FAST_VERIFY=1 found a backend disagreeing with eager
        print(f"error: verify mode: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    hidden = out.last_hidden_state
    print(f"output            last_hidden_state {list(hidden.shape)}, extract_features "
          f"{list(out.extract_features.shape)}")
    stride = math.prod(config.conv_stride)
    print(f"frames            {hidden.shape[1]} per row (one per {stride} samples = "
          f"{1000 * stride / SAMPLE_RATE:g} ms)")
    pick_note = " (each op takes the first usable backend: 'auto picks' below)" if requested == "auto" else ""
    print(f"backend           {requested}{pick_note}")
    warmup, timed = timings[0], timings[1:]
    median = statistics.median(timed)
    audio_seconds = args.batch * samples / SAMPLE_RATE
    print(f"timing [{where}], backend {requested}, eval + torch.inference_mode, batch {args.batch}:")
    print(f"  warm-up run       {warmup * 1000:.1f} ms")
    print(f"  median of {len(timed)} runs  {median * 1000:.1f} ms "
          f"({audio_seconds / median:.1f} s of audio per wall-clock second)")
    print()
    print(format_backend_table((device.type,)))
    return EXIT_OK


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``subparsers``."""
    from ..dispatch import BACKENDS

    demo = add_command(
        subparsers, "demo", cmd_demo,
        help="run a randomly initialised UniSpeechSatModel on random audio and time it",
        description="Build a randomly initialised UniSpeechSatModel, run it in eval mode under "
                    "torch.inference_mode on random 16 kHz audio, print shapes, parameter count, the "
                    "backend and timings (one warm-up run, then the median of --runs runs). No "
                    "checkpoint or network is needed.",
    )
    demo.add_argument("--seconds", type=positive(float, "--seconds"), default=4.0,
                      help="audio length per row in seconds (default: 4)")
    demo.add_argument("--model", choices=("base", "tiny"), default="base",
                      help="base: transformers' default UniSpeechSatConfig (about 94M parameters); "
                           "tiny: a small config for quick checks (default: base)")
    demo.add_argument("--batch", type=positive(int, "--batch"), default=1, help="batch size (default: 1)")
    demo.add_argument("--threads", type=positive(int, "--threads"), default=None,
                      help="torch CPU threads (default: torch's default)")
    demo.add_argument("--runs", type=positive(int, "--runs"), default=3,
                      help="timed runs after the warm-up; the median is reported (default: 3)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: cpu)")
    demo.add_argument("--backend", choices=("auto",) + tuple(BACKENDS), default=None,
                      help="force a backend (default: $UNISPEECH_FAST_BACKEND, else auto); a forced "
                           "backend that cannot run fails with the reasons")
    demo.add_argument("--seed", type=int, default=0, help="random seed for weights and audio (default: 0)")
    return demo
