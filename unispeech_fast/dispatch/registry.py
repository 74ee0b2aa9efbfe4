"""The dispatch registry: the backend and op names, each op's implementations per backend, and the
error raised when none can run a call. Nothing here imports an op: each op package registers its own
implementations (``unispeech_fast.ops.<op>``), and ``import unispeech_fast`` imports every op."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable

import torch

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


class BackendNotSupportedError(RuntimeError):
    """No backend (or not the forced one) can run this call; the message lists why."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one backend's implementation of an op supports, declared as data (xformers' ``AttentionOpBase``:
    ``SUPPORTED_DEVICES``, ``SUPPORTED_DTYPES``). :func:`capability_reasons` is the one base check that reads
    it; the implementation's own ``not_supported_reasons`` adds only what is specific to the call."""

    #: How the reasons name the implementation, e.g. ``"the C++ pos_conv"``.
    name: str
    #: Device types the call's tensors must be on (``"cpu"``, ``"cuda"``); empty for any.
    devices: tuple[str, ...] = ()
    #: Dtypes the call's first tensor may have; empty for any.
    dtypes: tuple[torch.dtype, ...] = ()
    #: Compiled ops (``torch.ops.unispeech_fast.<name>``) the implementation calls: the loaded extension must have
    #: a kernel for each on the backend's device (an extension built before an op existed has none).
    kernels: tuple[str, ...] = ()
    #: Calls the implementation serves without its kernel (e.g. ``need_weights=True`` runs the reference):
    #: nothing above is checked for them.
    unless: Callable[..., bool] | None = None


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def capability_reasons(caps: Capabilities, inputs: dict[str, Any], backend_name: str) -> list[str]:
    """The base check: why the call ``inputs`` is outside the capabilities ``caps`` declared by the
    ``backend_name`` implementation (empty if inside). The compiled kernels are looked up for the backend's
    device: CUDA for ``cuda``, CPU otherwise."""
    if caps.unless is not None and caps.unless(**inputs):
        return []
    from .. import _extension  # the only module that loads the compiled extension

    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    reasons = []
    if caps.devices:
        wrong = sorted({t.device.type for t in tensors if t.device.type not in caps.devices})
        if wrong:
            reasons.append(f"{caps.name} serves {' and '.join(d.upper() for d in caps.devices)} tensors, "
                           f"got {', '.join(wrong)}")
    if caps.dtypes and tensors and tensors[0].dtype not in caps.dtypes:
        reasons.append(f"{caps.name} runs {'/'.join(map(_short, caps.dtypes))}, got {tensors[0].dtype}")
    if caps.kernels:
        device = "cuda" if backend_name == "cuda" else "cpu"
        loaded, reason, has_cuda, cuda_reason = _extension.summary()
        if device == "cuda" and not has_cuda:
            reasons.append(f"CUDA extension not available: {cuda_reason}")
        elif not loaded:
            reasons.append(f"C++ extension not available: {reason}")
        else:
            reasons.extend(f"the loaded extension has no {device.upper()} kernel for {kernel} (built before it "
                           f"existed? rebuild: pip install --no-build-isolation -e .)"
                           for kernel in caps.kernels if not _extension.has_kernel(kernel, device))
    return reasons


@dataclasses.dataclass(frozen=True)
class OpImpl:
    op: str
    backend: str
    fn: Callable[..., Any]
    #: The base check of :attr:`capabilities` plus the implementation's call-specific reasons.
    not_supported_reasons: Callable[..., list[str]]
    is_stochastic: Callable[..., bool]
    capabilities: Capabilities | None = None


_REGISTRY: dict[str, dict[str, OpImpl]] = {op: {} for op in OPS}


def _no_reasons(**_: Any) -> list[str]:
    return []


def _never_stochastic(**_: Any) -> bool:
    return False


def _with_capabilities(
    caps: Capabilities | None, specific: Callable[..., list[str]], backend_name: str, fn: Callable[..., Any]
) -> Callable[..., list[str]]:
    """``specific`` preceded by the base check of ``caps``; takes the call's arguments by name, or in the
    order of the implementation ``fn``'s signature (the op's)."""
    if caps is None:
        return specific
    signature = inspect.signature(fn)

    def reasons(*args: Any, **inputs: Any) -> list[str]:
        if args:
            inputs = dict(signature.bind(*args, **inputs).arguments)
        return capability_reasons(caps, inputs, backend_name) + list(specific(**inputs))

    return reasons


def register(
    op: str,
    backend_name: str,
    *,
    not_supported_reasons: Callable[..., list[str]] | None = None,
    is_stochastic: Callable[..., bool] | None = None,
    capabilities: Capabilities | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as the implementation of ``op`` on ``backend_name``.

    ``capabilities`` declares the devices, dtypes and compiled kernels it supports (checked by
    :func:`capability_reasons`); ``not_supported_reasons(**inputs)`` adds only what depends on the call.
    """
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend_name not in BACKENDS:
        raise ValueError(f"unknown backend {backend_name!r}; expected one of {BACKENDS}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        reasons = _with_capabilities(capabilities, not_supported_reasons or _no_reasons, backend_name, fn)
        _REGISTRY[op][backend_name] = OpImpl(
            op, backend_name, fn, reasons, is_stochastic or _never_stochastic, capabilities
        )
        return fn

    return deco


def _unregister(op: str, backend_name: str) -> None:
    """Remove an implementation (used by tests that register a temporary backend)."""
    _REGISTRY[op].pop(backend_name, None)


_logged_once: set[str] = set()


def log_once(key: str, message: str) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        logger.warning(message)

