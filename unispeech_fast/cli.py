"""Command line: ``python -m unispeech_fast {info,demo}`` (also installed as ``unispeech-fast``).

``info`` reports versions, devices, the Triton interpreter switch, the compiled extension and which
backend can run which op. ``demo`` runs a randomly initialised UniSpeechSatModel on random audio and
times it. Exit codes: 0 success, 1 runtime failure (for example a forced backend that cannot run),
2 usage error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from typing import Sequence

__all__ = ["main", "build_parser", "tiny_config"]

SAMPLE_RATE = 16_000
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------------------------------- helpers
def _dist_version(module: str, *dists: str) -> str:
    """Installed version of ``module`` (without importing it), or ``"not installed"``."""
    if importlib.util.find_spec(module) is None:
        return "not installed"
    for dist in dists or (module,):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed (version unknown)"


def _row(label: str, value: object) -> str:
    return f"{label:<18}{value}"


def _triton_interpret_status() -> str:
    value = os.environ.get("TRITON_INTERPRET")
    if value is None:
        return "unset (Triton kernels need a GPU)"
    if value in ("", "0"):
        return f"{value!r} (off: Triton kernels need a GPU)"
    return f"{value!r} (on: Triton kernels run on CPU tensors through the interpreter, slowly)"


def _cuda_lines() -> tuple[bool, list[str]]:
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return False, ["not available (this torch is a CPU-only build)"]
    if not torch.cuda.is_available():
        return False, [f"not available (torch built for CUDA {torch.version.cuda}, but no usable GPU or driver)"]
    lines = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        lines.append(f"cuda:{index} {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    return True, [f"available, {len(lines)} device(s), torch built for CUDA {torch.version.cuda}"] + lines


def _implementation_summary() -> str:
    """Which backends have any registered implementation at all (registration, not usability)."""
    from . import dispatch

    registered = dispatch.implemented_backends()
    with_impl = [b for b in dispatch.BACKENDS if any(b in names for names in registered.values())]
    without = [b for b in dispatch.BACKENDS if b not in with_impl]
    text = "implemented backends: " + (", ".join(with_impl) or "none")
    if without:
        text += f"; no kernels implemented yet for: {', '.join(without)}"
    return text


def _extension_lines() -> list[str]:
    from . import _extension

    st = _extension.status()
    if not st.loaded:
        return [f"not loaded: {st.reason}"]
    lines = [f"loaded from {st.path}"]
    lines.append("CUDA ops: yes" if st.has_cuda else f"CUDA ops: no ({st.cuda_reason})")
    return lines


# ---------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import numpy
    import torch

    from . import __version__
    from .dispatch import format_backend_table

    package_dir = os.path.dirname(os.path.abspath(__file__))
    print(_row("unispeech_fast", f"{__version__} ({package_dir})"))
    print(_row("python", f"{platform.python_version()} ({platform.python_implementation()}, "
                         f"{sys.platform} {platform.machine()})"))
    print(_row("torch", torch.__version__))
    print(_row("triton", _dist_version("triton", "triton", "pytorch-triton")))
    print(_row("numpy", numpy.__version__))
    print(_row("transformers", _dist_version("transformers")))
    print()
    print("devices:")
    print(f"  cpu   {torch.get_num_threads()} torch threads, {os.cpu_count()} logical cores")
    cuda_ok, cuda_lines = _cuda_lines()
    print(f"  cuda  {cuda_lines[0]}")
    for line in cuda_lines[1:]:
        print(f"        {line}")
    print()
    print(_row("TRITON_INTERPRET", _triton_interpret_status()))
    ext = _extension_lines()
    print(_row("extension", ext[0]))
    for line in ext[1:]:
        print(_row("", line))
    print()
    print("backends (yes = usable on that device for this op; shapes and dtypes are checked per call):")
    print(_implementation_summary())
    print(format_backend_table(("cpu", "cuda") if cuda_ok else ("cpu",)))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- demo
def tiny_config():
    """A small UniSpeech-SAT config (same conv strides, so 20 ms frames) for quick runs and tests."""
    from .configuration import UniSpeechSatConfig

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

    from . import (BackendNotSupportedError, UniSpeechSatConfig, UniSpeechSatModel, VerificationError, backend,
                   current_backend)
    from .dispatch import format_backend_table

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


# ---------------------------------------------------------------------------------------------- parser
def _positive(kind: type, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be positive and finite, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .dispatch import BACKENDS

    parser = argparse.ArgumentParser(
        prog="unispeech-fast",
        description="UniSpeech / UniSpeech-SAT with custom kernels behind a checked dispatch layer.",
        epilog="Run `%(prog)s COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"unispeech_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="versions, devices, extension status and which backend can run which op",
        description="Print versions, devices, TRITON_INTERPRET, the compiled extension's status and the "
                    "backend table. Does not run a model.",
    )
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser(
        "demo",
        help="run a randomly initialised UniSpeechSatModel on random audio and time it",
        description="Build a randomly initialised UniSpeechSatModel, run it in eval mode under "
                    "torch.inference_mode on random 16 kHz audio, print shapes, parameter count, the "
                    "backend and timings (one warm-up run, then the median of --runs runs). No "
                    "checkpoint or network is needed.",
    )
    demo.add_argument("--seconds", type=_positive(float, "--seconds"), default=4.0,
                      help="audio length per row in seconds (default: 4)")
    demo.add_argument("--model", choices=("base", "tiny"), default="base",
                      help="base: transformers' default UniSpeechSatConfig (about 94M parameters); "
                           "tiny: a small config for quick checks (default: base)")
    demo.add_argument("--batch", type=_positive(int, "--batch"), default=1, help="batch size (default: 1)")
    demo.add_argument("--threads", type=_positive(int, "--threads"), default=None,
                      help="torch CPU threads (default: torch's default)")
    demo.add_argument("--runs", type=_positive(int, "--runs"), default=3,
                      help="timed runs after the warm-up; the median is reported (default: 3)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: cpu)")
    demo.add_argument("--backend", choices=("auto",) + tuple(BACKENDS), default=None,
                      help="force a backend (default: $UNISPEECH_FAST_BACKEND, else auto); a forced "
                           "backend that cannot run fails with the reasons")
    demo.add_argument("--seed", type=int, default=0, help="random seed for weights and audio (default: 0)")
    demo.set_defaults(func=cmd_demo)

    from . import audio_cli  # embed, transcribe, diarize, verify-speakers (files in, results out)
    from .bench import cli as bench_cli  # kernel and model benchmarks
    from .train import cli as train_cli  # finetune, pretrain (torchrun/DDP training from a manifest)

    audio_cli.add_parsers(sub)
    bench_cli.add_parser(sub)
    train_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on usage errors
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "demo" and args.backend is None:
        from .dispatch import current_backend

        try:
            args.backend = current_backend()
        except ValueError as exc:  # a bad $UNISPEECH_FAST_BACKEND
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
