"""Selection: which backend runs a call. Each implementation answers ``not_supported_reasons(**inputs)``;
``"auto"`` takes the first backend with no reasons, in the measured order where benchmarks ranked the
backends (``unispeech_fast/_auto_order.py``) and the default order elsewhere; a forced backend that
cannot run raises :class:`BackendNotSupportedError` listing every reason. :func:`call` runs the chosen
implementation (beside the reference in verify mode)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from .._auto_order import ORDERS as _MEASURED_ORDERS
from .context import current_backend
from .registry import _REGISTRY, BACKENDS, GPU_DEFAULT_ORDER, BackendNotSupportedError, OpImpl, log_once
from .verify import _compare, verify_enabled


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_reasons(name: str, device: torch.device | None) -> list[str]:
    """Why ``name`` cannot run at all on ``device`` (empty when it could, given an implementation)."""
    if name == "eager":
        return []
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed"]
        if device is not None and device.type == "cpu" and not _triton_interpret():
            return ["triton runs CPU tensors only under TRITON_INTERPRET=1"]
        if device is not None and device.type not in ("cpu", "cuda"):
            return [f"triton does not support device type {device.type!r}"]
        return []
    from .. import _extension  # the only module that loads the compiled extension

    loaded, reason, has_cuda, cuda_reason = _extension.summary()
    if name == "cpp":
        reasons = [] if loaded else [f"C++ extension not available: {reason}"]
        if device is not None and device.type != "cpu":
            reasons.append(f"cpp serves CPU tensors, got {device.type}")
        return reasons
    if name == "cuda":
        reasons = [] if has_cuda else [f"CUDA extension not available: {cuda_reason}"]
        if device is not None and device.type != "cuda":
            reasons.append(f"cuda serves CUDA tensors, got {device.type}")
        return reasons
    raise ValueError(f"unknown backend {name!r}")


_AUTO_SKIPS_INTERPRETER = (
    "auto does not pick the Triton interpreter (a correctness tool, far slower than any other backend); "
    "force it with backend('triton')"
)


def _reasons_for(
    op: str, name: str, inputs: dict[str, Any], device: torch.device | None, auto: bool = False
) -> list[str]:
    reasons = backend_reasons(name, device)
    if auto and name == "triton" and not reasons and device is not None and device.type == "cpu":
        reasons = [_AUTO_SKIPS_INTERPRETER]
    impl = _REGISTRY[op].get(name)
    if impl is None:
        reasons = reasons + [f"no {name} implementation of {op!r} exists yet"]
    elif not reasons:
        reasons = list(impl.not_supported_reasons(**inputs))
    return reasons


def _first_tensor(inputs: dict[str, Any]) -> torch.Tensor | None:
    """The call's first tensor argument: its device and dtype are the call's."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value
    return None


def _needs_grad(inputs: dict[str, Any]) -> bool:
    if not torch.is_grad_enabled():
        return False
    for value in inputs.values():
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in items):
            return True
    return False


#: How measured orders name this process's CPU: its vector ISA as torch reports it, since which backend
#: is fastest differs between, e.g., AVX2 and AVX-512 machines. Read once (not traceable).
CPU_KEY = f"cpu:{torch.backends.cpu.get_cpu_capability()}"


def device_key(device: torch.device | str) -> str:
    """The device part of a measured-order key: ``"cpu:<ISA>"`` for CPU, else the device type."""
    kind = torch.device(device).type
    return CPU_KEY if kind == "cpu" else kind


def auto_order(
    op: str, device: torch.device | str | None, dtype: torch.dtype | None, needs_grad: bool = False
) -> tuple[tuple[str, ...], bool]:
    """The order in which ``"auto"`` tries the backends for such a call, and whether it was measured.

    Measured orders (fastest first; mode ``fwd_bwd`` when ``needs_grad``, else ``fwd``) come from
    ``unispeech_fast/_auto_order.py``, which ``python -m unispeech_fast.bench.auto_order`` generates
    from benchmark results; backends they do not rank follow in the default order: :data:`GPU_DEFAULT_ORDER`
    for CUDA devices, :data:`BACKENDS` elsewhere.
    """
    default = default_order(device)
    if device is not None and dtype is not None:
        key = (device_key(device), op, str(dtype).replace("torch.", ""), "fwd_bwd" if needs_grad else "fwd")
        measured = _MEASURED_ORDERS.get(key)
        if measured:
            return tuple(measured) + tuple(b for b in default if b not in measured), True
    return default, False


def default_order(device: torch.device | str | None) -> tuple[str, ...]:
    """The unmeasured order of ``"auto"``: :data:`GPU_DEFAULT_ORDER` on CUDA devices, else :data:`BACKENDS`."""
    return GPU_DEFAULT_ORDER if device is not None and torch.device(device).type == "cuda" else BACKENDS


def select(op: str, inputs: dict[str, Any]) -> OpImpl:
    """The implementation that will run ``op`` on ``inputs`` under the current backend setting."""
    name = current_backend()
    first = _first_tensor(inputs)
    device = None if first is None else first.device
    if name != "auto":
        reasons = _reasons_for(op, name, inputs, device)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {name!r} cannot run {op!r} ({_describe(inputs)}):\n  - " + "\n  - ".join(reasons)
            )
        return _REGISTRY[op][name]
    collected: list[str] = []
    for candidate in auto_order(op, device, None if first is None else first.dtype, _needs_grad(inputs))[0]:
        reasons = _reasons_for(op, candidate, inputs, device, auto=True)
        if not reasons:
            return _REGISTRY[op][candidate]
        collected.extend(f"{candidate}: {r}" for r in reasons)
    raise BackendNotSupportedError(
        f"no backend can run {op!r} ({_describe(inputs)}):\n  - " + "\n  - ".join(collected)
    )


def _describe(inputs: dict[str, Any]) -> str:
    parts = []
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            parts.append(f"{key}={tuple(value.shape)} {str(value.dtype).replace('torch.', '')} {value.device.type}")
    return ", ".join(parts)


def call(op: str, **inputs: Any) -> Any:
    """Run ``op`` on the selected backend (checking against the reference in verify mode)."""
    impl = select(op, inputs)
    cfg = verify_enabled()
    if cfg is None or impl.backend == "eager":
        return impl.fn(**inputs)
    if impl.is_stochastic(**inputs):
        log_once(f"verify-stochastic-{op}", f"verify: {op} calls with randomness (dropout/Gumbel noise) "
                 "cannot be compared with the reference and are not verified")
        return impl.fn(**inputs)
    out = impl.fn(**inputs)
    ref_impl = _REGISTRY[op]["eager"]
    with torch.no_grad():
        ref = ref_impl.fn(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    _compare(op, impl, out, ref, cfg)
    return out


