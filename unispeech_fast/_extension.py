"""The one place that loads the compiled extension ``unispeech_fast._C``.

Nothing imports the extension at ``import unispeech_fast`` time; :func:`status` loads it on first
use and remembers why it could not (not built, or built for another torch). The package works
without it: the ``cpp`` and ``cuda`` backends then report themselves unavailable with that reason.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os

__all__ = ["ExtensionStatus", "has_kernel", "status", "summary"]


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    reason: str
    has_cuda: bool
    cuda_reason: str
    path: str | None = None


@functools.lru_cache(maxsize=None)
def status() -> ExtensionStatus:
    """Load ``unispeech_fast._C`` once and describe what it provides."""
    if os.environ.get("UNISPEECH_FAST_DISABLE_EXTENSION", "0") not in ("", "0"):
        why = "disabled by UNISPEECH_FAST_DISABLE_EXTENSION"
        return ExtensionStatus(False, why, False, why)
    spec = importlib.util.find_spec("unispeech_fast._C")
    if spec is None:
        why = (
            "unispeech_fast._C is not built (install with `pip install --no-build-isolation -e .` and a C++ "
            "compiler; UNISPEECH_FAST_SKIP_BUILD=1 at install time skips it)"
        )
        return ExtensionStatus(False, why, False, why)
    try:
        import torch  # noqa: F401  (loads libtorch, which the extension links against)

        module = importlib.import_module("unispeech_fast._C")
    except (ImportError, OSError) as exc:  # built against another torch / Python
        why = f"unispeech_fast._C failed to load: {exc}"
        return ExtensionStatus(False, why, False, why, spec.origin)
    has_cuda = bool(getattr(module, "built_with_cuda", lambda: False)())
    note = getattr(module, "cuda_build_note", lambda: "built without CUDA sources")()
    cuda_reason = "" if has_cuda else f"unispeech_fast._C: {note}"
    return ExtensionStatus(True, "", has_cuda, cuda_reason, spec.origin)


def constant_under_compile(fn):
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does: torch.compile calls it at trace
    time and bakes in the result instead of tracing it (it imports and loads a library, which dynamo
    cannot trace); correct for values fixed for the life of the process. The attribute is set directly
    because the public decorator imports torch._dynamo (and with it triton: seconds) at import time;
    tests/test_backend_models.py compiles whole models through it."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def summary() -> tuple[bool, str, bool, str]:
    """``(loaded, reason, has_cuda, cuda_reason)`` of :func:`status`, usable inside torch.compile."""
    st = status()
    return st.loaded, st.reason, st.has_cuda, st.cuda_reason


@constant_under_compile
def has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension has a ``device_type`` (``"cpu"``/``"cuda"``) kernel for
    ``torch.ops.unispeech_fast.<op>``: False when it is not loaded, and for an extension built before the op
    (or its kernel for that device) existed, instead of the dispatcher's error at the call."""
    if not status().loaded:
        return False
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    try:
        return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"unispeech_fast::{op}", key)
    except RuntimeError:  # no such schema: the extension was built before the op existed
        return False
