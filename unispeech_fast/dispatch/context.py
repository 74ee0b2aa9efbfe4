"""The backend context: which backend the ops run on in this thread or task (:func:`backend`, a context
variable, else ``$UNISPEECH_FAST_BACKEND``, else auto), with a plain mirror that torch.compile reads."""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator

import torch

from .registry import BACKENDS

_ENV_BACKEND = "UNISPEECH_FAST_BACKEND"

_backend_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("unispeech_fast_backend", default=None)


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

