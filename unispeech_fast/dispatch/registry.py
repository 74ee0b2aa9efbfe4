"""The dispatch registry: the backend and op names, each op's implementations per backend, and the
error raised when none can run a call. Nothing here imports an op: each op package registers its own
implementations (``unispeech_fast.ops.<op>``), and ``import unispeech_fast`` imports every op."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

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


_logged_once: set[str] = set()


def log_once(key: str, message: str) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        logger.warning(message)

