"""Which backends an op test runs: those whose capabilities, as registered with dispatch, declare support for
the case. A new backend is tested by declaring its capabilities, not by editing a list here or in a test."""

from __future__ import annotations

import pytest
import torch

from unispeech_fast import dispatch

#: Where a device-agnostic backend (Triton: no declared devices) is tested: the GPU if there is one, else the CPU
#: under Triton's interpreter (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_for(op: str, backend: str) -> str:
    """The device ``backend``'s implementation of ``op`` is tested on: the CPU if it declares the CPU, else
    :data:`DEVICE` for a backend that declares no device."""
    caps = dispatch._REGISTRY[op][backend].capabilities
    return "cpu" if caps is not None and "cpu" in caps.devices else DEVICE


def declaring(op: str, dtype: torch.dtype, *, cpu_kernels_only: bool = False) -> list:
    """``pytest.param`` per kernel backend (not ``eager``, the reference the tests compare with) whose declared
    capabilities admit CPU-runnable calls of ``op`` in ``dtype``: the backend declares the CPU or no device, and
    ``dtype`` or no dtype. The cuda backends declare CUDA only; their kernels are checked by ``gpu`` tests.

    ``cpu_kernels_only``: only backends that declare the CPU itself (compiled CPU kernels), for real-size cases
    that Triton's interpreter would take minutes over (Triton's real sizes are ``gpu`` tests)."""
    params = []
    for name, impl in dispatch._REGISTRY[op].items():
        caps = impl.capabilities
        if name == "eager":
            continue
        if caps is None:  # never skipped silently: a backend without declared capabilities would go untested
            raise AssertionError(f"the {name} backend of {op} registers no Capabilities: declare them (dispatch.register"
                                 f"(..., capabilities=...)) or name the backend in the test")
        devices_ok = "cpu" in caps.devices if cpu_kernels_only else (not caps.devices or "cpu" in caps.devices)
        if devices_ok and (not caps.dtypes or dtype in caps.dtypes):
            params.append(pytest.param(name, id=name))
    assert params, f"no backend declares {op} in {dtype} on the CPU"
    return params


def run_on(backend: str, fn):
    """``fn`` called under the forced ``backend`` (a forced backend that cannot run the call raises, listing why)."""
    def call(*args, **kwargs):
        with dispatch.backend(backend):
            return fn(*args, **kwargs)

    return call
