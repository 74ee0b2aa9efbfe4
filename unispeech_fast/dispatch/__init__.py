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

The package answers one question per module: :mod:`.registry` (the names and each op's implementations),
:mod:`.context` (the backend for this thread or task), :mod:`.selection` (which implementation runs a
call, and :func:`call`), :mod:`.verify` (verify mode) and :mod:`.report` (the ``info`` tables). It
imports no op: ``import unispeech_fast`` imports :mod:`unispeech_fast.ops`, whose op packages register
their implementations here.
"""

from __future__ import annotations

from .context import _ENV_BACKEND, backend, current_backend
from .registry import (
    _REGISTRY,
    BACKENDS,
    GPU_DEFAULT_ORDER,
    GPU_ORDER_REASON,
    OPS,
    BackendNotSupportedError,
    Capabilities,
    OpImpl,
    _logged_once,
    _unregister,
    capability_reasons,
    log_once,
    logger,
    register,
)
from .report import available_backends, format_backend_table, implemented_backends
from .selection import CPU_KEY, auto_order, backend_reasons, call, default_order, device_key, select
from .verify import VERIFY_TOLERANCES, VerificationError, _compare, verify, verify_enabled

__all__ = [
    "Capabilities",
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
