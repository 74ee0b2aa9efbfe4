"""``unispeech-fast info``: versions, devices, the Triton interpreter switch, the compiled extension and
which backend can run which op. Does not run a model."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys

from .common import EXIT_OK, add_command

__all__ = ["add_parser", "cmd_info"]


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
    from .. import dispatch

    registered = dispatch.implemented_backends()
    with_impl = [b for b in dispatch.BACKENDS if any(b in names for names in registered.values())]
    without = [b for b in dispatch.BACKENDS if b not in with_impl]
    text = "implemented backends: " + (", ".join(with_impl) or "none")
    if without:
        text += f"; no kernels implemented yet for: {', '.join(without)}"
    return text


def _extension_lines() -> list[str]:
    from .. import _extension

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

    from .. import __version__
    from ..dispatch import format_backend_table

    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``info`` subcommand to ``subparsers``."""
    return add_command(
        subparsers, "info", cmd_info,
        help="versions, devices, extension status and which backend can run which op",
        description="Print versions, devices, TRITON_INTERPRET, the compiled extension's status and the "
                    "backend table. Does not run a model.",
    )
