"""Backend dispatch for the fused ops.

Every op (``feature_extractor``, ``pos_conv``, ``attention``, ``gumbel_quantizer``, ``linear``,
``contrastive_loss``) has one eager PyTorch reference and may have implementations on the ``triton``,
``cuda`` and ``cpp`` backends.
Each implementation answers ``not_supported_reasons(**inputs)`` with plain-English reasons; in
``"auto"`` mode the first backend with no reasons runs the call, trying the backends fastest first
where benchmarks measured them for the call's device (CPU: its vector ISA), op, dtype and mode (the generated table
``unispeech_fast/_auto_order.py``) and in the default order :data:`BACKENDS` elsewhere; a forced
backend that cannot run raises :class:`BackendNotSupportedError` listing every reason. Nothing falls
back silently: a forced backend never degrades to another one.

Verify mode (:func:`verify` or ``UNISPEECH_FAST_VERIFY=1``) runs the eager reference beside the
chosen backend on every call and raises :class:`VerificationError` with the max error when they
disagree beyond the tolerance for the dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.util
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import torch

from ._auto_order import ORDERS as _MEASURED_ORDERS

__all__ = [
    "auto_order",
    "BACKENDS",
    "GPU_DEFAULT_ORDER",
    "OPS",
    "BackendNotSupportedError",
    "VerificationError",
    "backend",
    "current_backend",
    "verify",
    "verify_enabled",
    "available_backends",
    "register",
    "call",
    "implemented_backends",
    "format_backend_table",
]

logger = logging.getLogger("unispeech_fast")

#: All backend names, in the order ``"auto"`` tries them on CPU tensors where no measured order exists
#: (:func:`auto_order`).
BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpp", "eager")
#: The order ``"auto"`` tries on CUDA tensors where no measured order exists. No GPU benchmark has run yet,
#: so the validated Triton designs come first and eager (cuDNN, SDPA) before the hand-written CUDA kernels,
#: whose designs are estimated slower than cuDNN (pos_conv: fp32 CUDA cores, uncoalesced weight loads) and
#: SDPA (attention: a serial per-row softmax); a measured ``cuda`` row in ``_auto_order.py`` overrides this.
GPU_DEFAULT_ORDER: tuple[str, ...] = ("triton", "eager", "cuda", "cpp")
GPU_ORDER_REASON = (
    "on CUDA tensors auto tries " + ", ".join(GPU_DEFAULT_ORDER) + " until GPU benchmarks measure an order: "
    "the CUDA kernels are unmeasured and estimated slower than Triton and cuDNN/SDPA"
)
#: The ops that go through dispatch.
OPS: tuple[str, ...] = (
    "feature_extractor", "pos_conv", "attention", "gumbel_quantizer", "linear", "contrastive_loss",
)

_ENV_BACKEND = "UNISPEECH_FAST_BACKEND"
_ENV_VERIFY = "UNISPEECH_FAST_VERIFY"

_backend_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("unispeech_fast_backend", default=None)
_verify_var: contextvars.ContextVar[dict | None] = contextvars.ContextVar("unispeech_fast_verify", default=None)

# Default verify tolerances (atol, rtol) per dtype, as used when the caller gives none.
VERIFY_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


class BackendNotSupportedError(RuntimeError):
    """No backend (or not the forced one) can run this call; the message lists why."""


class VerificationError(AssertionError):
    """Verify mode found a backend output that disagrees with the eager reference."""


@dataclasses.dataclass(frozen=True)
class OpImpl:
    op: str
    backend: str
    fn: Callable[..., Any]
    not_supported_reasons: Callable[..., list[str]]
    is_stochastic: Callable[..., bool]


_REGISTRY: dict[str, dict[str, OpImpl]] = {op: {} for op in OPS}


def _no_reasons(**_: Any) -> list[str]:
    return []


def _never_stochastic(**_: Any) -> bool:
    return False


def register(
    op: str,
    backend_name: str,
    *,
    not_supported_reasons: Callable[..., list[str]] | None = None,
    is_stochastic: Callable[..., bool] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as the implementation of ``op`` on ``backend_name``."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend_name not in BACKENDS:
        raise ValueError(f"unknown backend {backend_name!r}; expected one of {BACKENDS}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[op][backend_name] = OpImpl(
            op, backend_name, fn, not_supported_reasons or _no_reasons, is_stochastic or _never_stochastic
        )
        return fn

    return deco


def _unregister(op: str, backend_name: str) -> None:
    """Remove an implementation (used by tests that register a temporary backend)."""
    _REGISTRY[op].pop(backend_name, None)


# ---------------------------------------------------------------------------------------------- backends
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
    from . import _extension  # the only module that loads the compiled extension

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


# ---------------------------------------------------------------------------------------------- selection
def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


# torch.compile cannot trace ContextVar.get: while compiling, the selection is read from this plain
# mirror instead (dynamo guards on it, so entering another backend recompiles). It holds the backend
# most recently entered by any thread, so under torch.compile use one backend per process.
_compile_mirror: dict[str, Any] = {"backend": None, "verify": None}


def current_backend() -> str:
    """The backend requested for this context: ``backend()`` if active, else ``$UNISPEECH_FAST_BACKEND``, else auto."""
    name = _compile_mirror["backend"] if torch.compiler.is_compiling() else _backend_var.get()
    if name is None:
        env = os.environ.get(_ENV_BACKEND, "").strip()
        if env:
            try:
                return _check_name(env)
            except ValueError as exc:
                raise ValueError(f"${_ENV_BACKEND}: {exc}") from None
        return "auto"
    return name


@contextlib.contextmanager
def backend(name: str = "auto") -> Iterator[str]:
    """Context manager selecting the backend for every op called inside it.

    ``"auto"`` picks the first backend that supports each call; any other name forces that backend
    and raises :class:`BackendNotSupportedError` where it cannot run.

    The setting is a context variable: it holds in this thread (or asyncio task) only. Threads and
    thread pools started inside the block run the default (``$UNISPEECH_FAST_BACKEND``, else auto)
    unless they enter ``backend()`` themselves or run in ``contextvars.copy_context()``.
    """
    token = _backend_var.set(_check_name(name))
    previous, _compile_mirror["backend"] = _compile_mirror["backend"], name
    try:
        yield name
    finally:
        _backend_var.reset(token)
        _compile_mirror["backend"] = previous


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


# ---------------------------------------------------------------------------------------------- verify
def verify_enabled() -> dict | None:
    cfg = _compile_mirror["verify"] if torch.compiler.is_compiling() else _verify_var.get()
    if cfg is not None:
        return cfg
    if os.environ.get(_ENV_VERIFY, "0") not in ("", "0"):
        return {"atol": None, "rtol": None}
    return None


@contextlib.contextmanager
def verify(atol: float | None = None, rtol: float | None = None) -> Iterator[None]:
    """Run the eager reference beside the chosen backend on every op call and compare.

    Raises :class:`VerificationError` naming the op, the backend and the max abs error when
    ``|out - ref| > atol + rtol * |ref|`` anywhere. Tolerances default per dtype
    (:data:`VERIFY_TOLERANCES`). Stochastic calls (dropout, Gumbel sampling) cannot be compared and
    are logged, once per op, as not verified.
    """
    token = _verify_var.set({"atol": atol, "rtol": rtol})
    previous, _compile_mirror["verify"] = _compile_mirror["verify"], {"atol": atol, "rtol": rtol}
    try:
        yield
    finally:
        _verify_var.reset(token)
        _compile_mirror["verify"] = previous


_logged_once: set[str] = set()


def log_once(key: str, message: str) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        logger.warning(message)


def _flatten(out: Any) -> list[torch.Tensor | None]:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [out] if (out is None or isinstance(out, torch.Tensor)) else []


def _compare(op: str, impl: OpImpl, out: Any, ref: Any, cfg: dict) -> None:
    outs, refs = _flatten(out), _flatten(ref)
    if len(outs) != len(refs):
        raise VerificationError(f"{op} on {impl.backend}: {len(outs)} outputs, reference has {len(refs)}")
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o is None or r is None:
            if (o is None) != (r is None):
                raise VerificationError(f"{op} on {impl.backend}: output {i} is None on one side only")
            continue
        if o.shape != r.shape:
            raise VerificationError(f"{op} on backend {impl.backend!r}: output {i} has shape {tuple(o.shape)}, "
                                    f"the eager reference {tuple(r.shape)}")
        if o.dtype != r.dtype:
            raise VerificationError(f"{op} on backend {impl.backend!r}: output {i} has dtype {o.dtype}, "
                                    f"the eager reference {r.dtype}")
        if o.device != r.device:
            raise VerificationError(f"{op} on backend {impl.backend!r}: output {i} is on {o.device}, "
                                    f"the eager reference on {r.device}")
        o64, r64 = o.detach().double(), r.detach().double()
        # Non-finite values are compared as such: NaN where the reference has none (or none where it
        # has one), and an infinity that differs from the reference's, are reported by count.
        o_nan, r_nan = torch.isnan(o64), torch.isnan(r64)
        o_inf, r_inf = torch.isinf(o64), torch.isinf(r64)
        nan_bad = int((o_nan != r_nan).sum())
        inf_bad = int(((o_inf | r_inf) & ~(o_nan | r_nan) & (o64 != r64)).sum())
        if nan_bad or inf_bad:
            parts = []
            if nan_bad:
                parts.append(f"{int((o_nan & ~r_nan).sum())} NaN where the reference is not NaN, "
                             f"{int((r_nan & ~o_nan).sum())} not NaN where the reference is")
            if inf_bad:
                parts.append(f"{inf_bad} infinite value(s) that differ from the reference")
            raise VerificationError(
                f"{op} on backend {impl.backend!r}: output {i} has non-finite values the eager reference does not "
                f"({'; '.join(parts)}; of {o.numel()} elements)"
            )
        default_atol, default_rtol = VERIFY_TOLERANCES.get(r.dtype, (0.0, 0.0))
        atol = default_atol if cfg["atol"] is None else cfg["atol"]
        rtol = default_rtol if cfg["rtol"] is None else cfg["rtol"]
        finite = torch.isfinite(o64) & torch.isfinite(r64)  # the rest matched exactly above
        err = torch.where(finite, (o64 - r64).abs(), torch.zeros_like(o64))
        bad = err > atol + rtol * torch.where(finite, r64.abs(), torch.zeros_like(r64))
        if bool(bad.any()):
            raise VerificationError(
                f"{op} on backend {impl.backend!r} disagrees with the eager reference: output {i}, "
                f"max abs error {err.max().item():.3e} "
                f"(atol={atol:g}, rtol={rtol:g}, {int(bad.sum())} of {bad.numel()} elements out of tolerance)"
            )


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


# ---------------------------------------------------------------------------------------------- reporting
def available_backends(device: str | torch.device | None = None) -> dict[str, dict[str, list[str]]]:
    """Per op and backend, the reasons it cannot run on ``device`` (an empty list means usable).

    ``device`` defaults to ``"cpu"``; pass ``"cuda"`` to ask about the GPU. Shape/dtype-specific
    limits are not included: those are checked per call.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    _ensure_ops_registered()
    table: dict[str, dict[str, list[str]]] = {}
    for op in OPS:
        table[op] = {}
        for name in BACKENDS:
            reasons = list(backend_reasons(name, dev))
            if _REGISTRY[op].get(name) is None:
                reasons.append(f"no {name} implementation of {op!r} exists yet")
            table[op][name] = reasons
    return table


def implemented_backends() -> dict[str, list[str]]:
    """Per op, the backends that have a registered implementation (whether or not usable here)."""
    _ensure_ops_registered()
    return {op: [name for name in BACKENDS if name in _REGISTRY[op]] for op in OPS}


def format_backend_table(devices: Sequence[str] = ("cpu",)) -> str:
    """A readable table of which backend can run which op, per device, with every reason."""
    lines = []
    width = max(len(op) for op in OPS)
    for dev in devices:
        table = available_backends(dev)
        lines.append(f"device {dev}:")
        lines.append(f"  {'op'.ljust(width)}  " + "  ".join(b.ljust(6) for b in BACKENDS) + "  auto picks")
        notes: dict[str, dict[str, None]] = {name: {} for name in BACKENDS}
        missing: dict[str, list[str]] = {name: [] for name in BACKENDS}
        measured_any = False
        for op in OPS:
            cells, pick = [], "-"
            order, measured = auto_order(op, dev, torch.float32)
            measured_any |= measured
            for name in order:
                if not table[op][name] and not (name == "triton" and torch.device(dev).type == "cpu"):
                    pick = name + (" (measured order)" if measured else "")  # auto never picks the interpreter
                    break
            for name in BACKENDS:
                reasons = table[op][name]
                cells.append(("yes" if not reasons else "no").ljust(6))
                for reason in reasons:
                    if reason.startswith(f"no {name} implementation"):
                        missing[name].append(op)
                    else:
                        notes[name][reason] = None
            lines.append(f"  {op.ljust(width)}  " + "  ".join(cells) + f"  {pick}")
        for name in BACKENDS:
            why = list(notes[name])
            if missing[name]:
                why.insert(0, "no kernel implemented yet for " + ", ".join(missing[name]))
            if why:
                lines.append(f"  {name}: " + "; ".join(why))
        lines.append("  auto picks for float32 inference: " + (
            "fastest first where benchmarks measured the op here (unispeech_fast/_auto_order.py), else "
            if measured_any else "no measured order for this device; ") + "the default order "
            + ", ".join(default_order(dev)))
    lines.append("  " + GPU_ORDER_REASON)
    return "\n".join(lines)


def _ensure_ops_registered() -> None:
    # Importing the op modules registers their implementations.
    from . import ops  # noqa: F401
